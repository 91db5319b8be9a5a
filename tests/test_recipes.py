"""Weight/input recipes, static-scale calibration, NVFP4's two-level scale, per-item stochastic
rounding and the block Hadamard transform of ``QuantInjector`` (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import harness.inject
from harness.formats import fake_quantize, nvfp4_per_tensor_scale
from harness.inject import QuantInjector
from harness.models import load_model
from harness.recipes import RECIPES, get_recipe, recipe_id
from harness.transforms import BlockRotation, hadamard_matrix


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _ids(tok, texts: list[str]) -> dict:
    return tok(texts, return_tensors="pt", padding=True)


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _linear(model: nn.Module) -> tuple[str, nn.Linear]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")


def test_every_recipe_names_registered_formats_and_the_issue_names_exist() -> None:
    for name in ("w4a16-mxfp4", "w4a16-int4-g128", "w8a8-fp8-dynamic", "w8a8-int8", "w4a8-nvfp4-fp8", "w4a4-nvfp4"):
        assert name in RECIPES
    assert get_recipe("w4a8-nvfp4-fp8").per_tensor_scale and recipe_id("nvfp4", "fp8_e4m3_row") == "w4a8-nvfp4-fp8"
    assert recipe_id("mxfp4", "fp8_e4m3_row") == "w-mxfp4+a-fp8_e4m3_row"
    with pytest.raises(ValueError, match="unknown recipe 'w4a4'; valid recipes: w4a16-mxfp4"):
        get_recipe("w4a4")


def test_a_recipe_quantizes_weights_and_inputs_with_their_own_formats(tiny) -> None:
    """``weight="fp8_e4m3_row", input="mxfp8_e4m3"``: each Linear's weight by the first and its
    input by the second, i.e. ``F.linear(Q_in(x), Q_w(W))``."""
    model, tok = tiny
    _, linear = _linear(model)
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, out) -> None:
        seen["x"], seen["out"] = args[0].detach(), out.detach()

    raw = linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0].detach()))
    with QuantInjector(model, weight="fp8_e4m3_row", input="mxfp8_e4m3") as inj:
        handle = linear.register_forward_hook(record)
        try:
            _logits(model, _ids(tok, ["Question: 2 + 3?"]))
        finally:
            handle.remove()
            raw.remove()
        weight = linear.weight.detach().clone()
    assert torch.equal(weight, fake_quantize(linear.weight, "fp8_e4m3_row"))
    expected = nn.functional.linear(fake_quantize(seen["raw"], "mxfp8_e4m3"), weight, linear.bias)
    assert torch.equal(seen["out"], expected)
    assert {(m.format, m.input_format) for m in inj.modules} == {("fp8_e4m3_row", "mxfp8_e4m3")}
    assert inj.point == "both"


def test_recipe_equals_its_formats_and_the_old_call_stays(tiny) -> None:
    model, tok = tiny
    inputs = _ids(tok, ["Question: 2 + 3?\nAnswer: 5"])
    with QuantInjector(model, recipe="w8a8-fp8-dynamic"):
        by_recipe = _logits(model, inputs)
    with QuantInjector(model, weight="fp8_e4m3_row", input="fp8_e4m3_row"):
        by_formats = _logits(model, inputs)
    with QuantInjector(model, "fp8_e4m3_row", "both"):
        shorthand = _logits(model, inputs)
    assert torch.equal(by_recipe, by_formats) and torch.equal(by_recipe, shorthand)
    with pytest.raises(ValueError, match="name the formats one way"):
        QuantInjector(model, "mxfp4", weight="nvfp4")


def test_a_static_input_format_without_calibration_is_a_clear_error(tiny) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match=r"'fp8_e4m3_tensor' at the input is static .*pass calibration="):
        QuantInjector(model, recipe="w8a8-fp8-static")


def test_calibration_fixes_each_static_input_scale_to_the_max_observed(tiny) -> None:
    """Max observer: each Linear's calibrated range is the max |x| its input reached over the
    calibration sequences (run with the weights quantized), and evaluation then uses that one
    scale for every token: quantizing one text alone or beside another gives the same output."""
    model, tok = tiny
    name, linear = _linear(model)
    calibration = [tok("Question: what is 7 * 6?")["input_ids"], tok("Answer: 42, clearly.")["input_ids"]]
    seen: list[float] = []
    with QuantInjector(model, weight="fp8_e4m3_tensor"):
        handle = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax().item()))
        try:
            for ids in calibration:
                _logits(model, {"input_ids": torch.tensor([ids])})
        finally:
            handle.remove()
    with QuantInjector(model, recipe="w8a8-fp8-static", calibration=calibration) as inj:
        quantizer = inj._input_quantizers[0]
        assert quantizer.name == name and quantizer.calibrated_amax.item() == max(seen)
        alone = _logits(model, _ids(tok, ["Question: 1 + 1?"]))
        batched = _logits(model, _ids(tok, ["Question: 1 + 1?", "A much longer second question with more tokens?"]))
    width = alone.shape[1]
    torch.testing.assert_close(batched[:1, :width], alone, rtol=1e-5, atol=1e-5)


def test_nvfp4_recipes_use_the_per_weight_two_level_scale(tiny) -> None:
    """``w4a16-nvfp4``: every weight with its own fp32 second-level scale ``amax / (448 * 6)``,
    as NVFP4 checkpoints store it; without it, |w| < 2**-8 * 6 ... flush (LLM weights are small),
    so the two-level error is lower."""
    model, _ = tiny
    _, linear = _linear(model)
    w = linear.weight.detach().clone()
    with QuantInjector(model, recipe="w4a16-nvfp4"):
        got = linear.weight.detach().clone()
    assert torch.equal(got, fake_quantize(w, "nvfp4", per_tensor_scale=nvfp4_per_tensor_scale(w)))
    with QuantInjector(model, "nvfp4", "weight", per_tensor_scale="amax"):
        assert torch.equal(linear.weight, got)
    with QuantInjector(model, "nvfp4", "weight"):
        single = linear.weight.detach().clone()
    assert (got - w).pow(2).sum() < (single - w).pow(2).sum()


def test_stochastic_rounding_at_inputs_does_not_depend_on_batch_mates(tiny) -> None:
    """``mxfp4_sr`` at the input: an item's logits are the same alone and beside another item
    (its noise is keyed by its own tokens and positions, not by its row in the padded batch)."""
    model, tok = tiny
    text = "Question: 2 + 3?\nAnswer: 5"
    with QuantInjector(model, "mxfp4_sr", "input", seed=3):
        alone = _logits(model, _ids(tok, [text]))
        second = _logits(model, _ids(tok, ["Some other, longer item goes first here.", text]))
        first = _logits(model, _ids(tok, [text, "Some other, longer item goes first here."]))
    width = alone.shape[1]
    assert torch.equal(first[:1, :width], alone)
    mask = _ids(tok, ["Some other, longer item goes first here.", text])["attention_mask"][1].bool()
    torch.testing.assert_close(second[1][mask][:width], alone[0], rtol=0, atol=0)


def test_hadamard_matrix_is_orthonormal_with_and_without_signs() -> None:
    for seed in (None, 5):
        h = hadamard_matrix(32, seed=seed)
        torch.testing.assert_close(h @ h.T, torch.eye(32), rtol=0, atol=1e-6)
    assert not torch.equal(hadamard_matrix(32, seed=5), hadamard_matrix(32))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(24)


@pytest.mark.parametrize("point", ["weight", "both"])
@pytest.mark.parametrize("seed", [None, 1])
def test_the_transform_without_quantization_leaves_the_model_unchanged(tiny, monkeypatch, point, seed) -> None:
    """fp32: with quantization replaced by the identity, ``(X R)(W R)ᵀ`` (and ``(W R) Rᵀ``) give
    the model's own logits to a relative error <= 1e-5."""
    model, tok = tiny
    inputs = _ids(tok, ["Question: 2 + 3?\nAnswer: 5"])
    reference = _logits(model, inputs)
    monkeypatch.setattr(harness.inject, "fake_quantize", lambda x, fmt, **kw: x.clone())
    with QuantInjector(model, "mxfp4", point, transform="hadamard", transform_seed=seed):
        rotated = _logits(model, inputs)
    assert ((rotated - reference).norm() / reference.norm()).item() <= 1e-5


def test_w4a16_with_hadamard_is_q_of_w_h_times_h_transposed(tiny) -> None:
    model, _ = tiny
    _, linear = _linear(model)
    w = linear.weight.detach().clone()
    r = BlockRotation(32)
    with QuantInjector(model, "mxfp4", "weight", transform="hadamard"):
        got = linear.weight.detach().clone()
    assert torch.equal(got, r.unrotate(fake_quantize(r.rotate(w), "mxfp4")))
