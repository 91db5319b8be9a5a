"""Named quantization recipes: a weight format paired with an input (activation) format, as the
deployments name them (``w4a16-int4-g128``, ``w8a8-fp8-dynamic``, ``w4a8-nvfp4-fp8``, ...).

A recipe is data: ``QuantInjector(model, recipe="w8a8-fp8-dynamic")`` is
``QuantInjector(model, weight="fp8_e4m3_row", input="fp8_e4m3_row")``.  NVFP4 recipes quantize
their weights with the two-level scale (a per-tensor fp32 scale ``amax / (448 * 6)`` computed per
weight, as NVIDIA ModelOpt and vLLM's NVFP4 checkpoints store it); ``tensor`` input formats are
static and calibrate their scale (a max observer) on calibration texts.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.formats import get_format
from harness.vocab import Registry


@dataclass(frozen=True)
class Recipe:
    """``weight`` / ``input``: format names or None (that side stays in the model's precision);
    ``per_tensor_scale``: NVFP4's two-level scale for the NVFP4 side(s); ``deployment``: the
    scheme it stands for."""

    name: str
    weight: str | None
    input: str | None
    deployment: str
    per_tensor_scale: bool = False

    @property
    def point(self) -> str:
        """The injection point it covers: ``weight``, ``input`` or ``both``."""
        return "both" if self.weight and self.input else ("weight" if self.weight else "input")


RECIPES: Registry[Recipe] = Registry(
    "recipe",
    (
        Recipe("w4a16-mxfp4", "mxfp4", None, "MXFP4 weight-only (OCP MX; QeRL's W4A16)"),
        Recipe("w4a16-nvfp4", "nvfp4", None, "NVFP4 weight-only (ModelOpt NVFP4_AWQ-style, two-level)", True),
        Recipe("w4a16-int4-g128", "int4_g128", None, "INT4 group-128 symmetric (llm-compressor W4A16, GPTQ)"),
        Recipe("w4a16-int4-g128-asym", "int4_g128_asym", None, "INT4 group-128 with zero point (W4A16_ASYM, AWQ)"),
        Recipe("w8a16-int8", "int8_row", None, "INT8 per-channel weight-only (torchao Int8WeightOnly)"),
        Recipe("w8a16-fp8", "fp8_e4m3_row", None, "FP8 per-channel weight-only (Marlin FP8 weight-only)"),
        Recipe("w8a8-fp8-dynamic", "fp8_e4m3_row", "fp8_e4m3_row", "FP8_DYNAMIC: per-channel weights, per-token"),
        Recipe("w8a8-fp8-static", "fp8_e4m3_tensor", "fp8_e4m3_tensor", "FP8 per-tensor, static calibrated inputs"),
        Recipe("w8a8-fp8-block", "fp8_e4m3_b128", "fp8_e4m3_g128", "FP8_BLOCK (DeepSeek-V3): 128x128 / 1x128"),
        Recipe("w8a8-int8", "int8_row", "int8_row", "INT8 W8A8: per-channel weights, per-token dynamic inputs"),
        Recipe("w8a8-int8-vllm", "int8_row", "int8_row_vllm", "INT8 W8A8 with vLLM's per-token input kernel"),
        Recipe("w8a8-mxfp8", "mxfp8_e4m3", "mxfp8_e4m3", "MXFP8 weights and activations"),
        Recipe("w4a8-nvfp4-fp8", "nvfp4", "fp8_e4m3_row", "NVFP4 weights, FP8 per-token inputs (W4A8)", True),
        Recipe("w4a8-mxfp4-mxfp8", "mxfp4", "mxfp8_e4m3", "MXFP4 weights, MXFP8 inputs (W4A8)"),
        Recipe("w4a4-nvfp4", "nvfp4", "nvfp4", "NVFP4 weights and activations (ModelOpt NVFP4)", True),
        Recipe("w4a4-mxfp4", "mxfp4", "mxfp4", "MXFP4 weights and activations"),
    ),
)


def list_recipes() -> list[str]:
    """Names of every recipe, in registry order."""
    return RECIPES.names()


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; :class:`harness.vocab.UnknownName` naming the valid recipes otherwise."""
    return RECIPES.get(name)


def recipe_id(weight: str | None, input: str | None) -> str:
    """The id a (weight, input) pair carries in case ids and baselines: the recipe's name when a
    recipe has exactly this pair, else ``w-<weight>`` / ``a-<input>`` joined by ``+``."""
    for r in RECIPES.values():
        if (r.weight, r.input) == (weight, input):
            return r.name
    return "+".join(p for p in (weight and f"w-{weight}", input and f"a-{input}") if p)


def check_formats(weight: str | None, input: str | None) -> None:
    """ValueError (naming the valid formats) for unknown names; at least one side is needed."""
    if weight is None and input is None:
        raise ValueError("a recipe needs a weight format, an input format or both")
    for f in (weight, input):
        if f is not None:
            get_format(f)


def needs_calibration(input: str | None, per_tensor_scale: bool) -> bool:
    """Whether an input format's scale is fixed by calibration: per-tensor formats, and NVFP4
    inputs with the two-level scale."""
    if input is None:
        return False
    fmt = get_format(input)
    return fmt.static_at_input or (per_tensor_scale and fmt.scale.supports_per_tensor_scale)


def calibration_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of calibration texts under the harness's BOS policy (:func:`harness.batching.encode`)."""
    from harness.batching import encode

    return [encode(tokenizer, t) for t in texts]
