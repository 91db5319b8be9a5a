"""The format registry: one frozen :class:`Format` entry per name (adding a format is one entry)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from harness.formats.affine import INT4, INT8_CODES, AmaxScale, Element
from harness.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, INT8
from harness.formats.scales import E4M3Scale, E8M0Scale, ScaleFormat, ScaleMode
from harness.vocab import Registry

GROUPINGS = ("block", "tile", "row", "tensor")
"""How a format shares its scales: 1-D ``block`` along an axis, 2-D ``tile`` of the last two
dims, a whole ``row`` along the axis (per output channel of a weight, per token of an
activation) or the whole ``tensor``."""


@dataclass(frozen=True)
class Format:
    """A block-scaled low-precision format: element type, block shape, scale encoding.

    ``stochastic`` formats round with a ``torch.Generator``'s draws. ``scale.mode`` is the
    shared-exponent rule (:meth:`with_scale_mode`); fast paths check it,
    ``element.twos_complement`` and the block shape before taking a format.
    """

    name: str
    element: Element
    block_shape: tuple[int, ...]
    scale: ScaleFormat | AmaxScale
    description: str
    stochastic: bool = False
    whole: str = ""  # "row" or "tensor": one scale per row along the axis / per tensor (block_shape ())
    library: str = ""  # the implementation this format equals bit for bit
    differs: str = ""  # how the other libraries' versions of it differ

    @property
    def grouping(self) -> str:
        """One of :data:`GROUPINGS`."""
        return self.whole or ("tile" if len(self.block_shape) == 2 else "block")

    @property
    def microscaling(self) -> bool:
        """A block format with an encoded E8M0 or E4M3 block scale (the MX family and NVFP4)."""
        return isinstance(self.scale, (E8M0Scale, E4M3Scale))

    @property
    def static_at_input(self) -> bool:
        """Its activation scale is fixed in deployment (per tensor): it needs calibration."""
        return self.grouping == "tensor"

    @property
    def block_size(self) -> int:
        return math.prod(self.block_shape)

    @property
    def bits_per_element(self) -> float:
        """Storage cost: element bits plus the block scale's (and zero point's) bits shared over
        the block; a row or tensor scale adds a negligible share, not counted."""
        if self.whole:
            return float(self.element.bits)
        zero_point = 8 if getattr(self.scale, "asymmetric", False) else 0
        return self.element.bits + (self.scale.bits + zero_point) / self.block_size

    def with_scale_mode(self, mode: str) -> Format:
        """This format under scale rule ``mode`` (:class:`harness.formats.scales.ScaleMode`)."""
        mode = ScaleMode.parse(mode)
        return self if mode == self.scale.mode else replace(self, scale=self.scale.with_mode(mode))


_MX = E8M0Scale()
_TORCHAO_MX = "torchao 0.18 MXTensor.to_mx(...).dequantize() (OCP MX v1.0), every ScaleCalculationMode"
_CT = "compressed-tensors 0.20 fake_quantize with calculate_qparams (its QuantizationArgs)"
_CT_FP8 = AmaxScale("amax/448 (compressed-tensors)", 448.0, "eps", "zero", bits=16, adds_zero=True)
_CT_FP8_DIFFERS = "torchao and vLLM compute x/scale in fp32 (compressed-tensors in the input dtype)"
_TORCHAO_FP8 = AmaxScale("amax/448 (torchao)", 448.0, 1e-12, "amax", storage_dtype="float32")
_TORCHAO_INT8 = AmaxScale(
    "amax/127.5 (torchao)", 127.5, float(torch.finfo(torch.float32).eps), "scale", storage_dtype="float32",
    apply="reciprocal",
)  # fmt: skip
_TORCHAO_INT8_LIB = "torchao 0.18 Int8Tensor.from_hp (choose_qparams_affine, quantize_affine, dequantize_affine)"
_INT8_DIFFERS = (
    "compressed-tensors also uses amax/127.5 but divides in the input dtype; vLLM's kernels and ModelOpt "
    "use amax/127 (int8_row_vllm)"
)
FORMATS: Registry[Format] = Registry(
    "format",
    (
        Format(
            "mxfp4", E2M1, (32,), _MX, "OCP MXFP4: E2M1 elements, 32-element blocks, E8M0 scale", library=_TORCHAO_MX
        ),
        Format(
            "mxfp4_sr",
            E2M1,
            (32,),
            _MX,
            "MXFP4 with unbiased stochastic rounding driven by a torch.Generator",
            stochastic=True,
            library="mxfp4's scale with Philox4x32-10 stochastic rounding (no library equivalent)",
        ),
        Format(
            "mxfp4_2d",
            E2M1,
            (32, 32),
            _MX,
            "MXFP4 with one E8M0 scale per 32x32 tile of the last two dims",
            library="OCP MX v1.0 rule on true 32x32 tiles (scalar reference; no library has it)",
        ),
        Format("mxfp6_e2m3", E2M3, (32,), _MX, "OCP MXFP6 E2M3, 32-element blocks, E8M0 scale", library=_TORCHAO_MX),
        Format("mxfp6_e3m2", E3M2, (32,), _MX, "OCP MXFP6 E3M2, 32-element blocks, E8M0 scale", library=_TORCHAO_MX),
        Format("mxfp8_e4m3", E4M3, (32,), _MX, "OCP MXFP8 E4M3, 32-element blocks, E8M0 scale", library=_TORCHAO_MX),
        Format("mxfp8_e5m2", E5M2, (32,), _MX, "OCP MXFP8 E5M2, 32-element blocks, E8M0 scale", library=_TORCHAO_MX),
        Format(
            "mxint8",
            INT8,
            (32,),
            _MX,
            "OCP MXINT8: int8 elements k * 2**-6, 32-element blocks, E8M0",
            library="OCP MX v1.0 MXINT8 (microxcaling int8 elements, round half to even)",
        ),
        Format(
            "nvfp4",
            E2M1,
            (16,),
            E4M3Scale(),
            "NVFP4: E2M1 elements, 16-element blocks, E4M3 scale (optional fp32 per-tensor scale)",
            library="torchao 0.18 NVFP4Tensor.to_nvfp4(...).dequantize()",
        ),
        Format(
            "fp8_e4m3_tensor",
            E4M3,
            (),
            _CT_FP8,
            "FP8 E4M3, one amax/448 scale per tensor (static at activations: calibrated)",
            whole="tensor",
            library=_CT,
            differs=_CT_FP8_DIFFERS,
        ),
        Format(
            "fp8_e4m3_row",
            E4M3,
            (),
            _TORCHAO_FP8,
            "FP8 E4M3, one amax/448 scale per row: per output channel (weights), per token (activations)",
            whole="row",
            library="torchao 0.18 Float8Tensor PerRow (quant_primitives._choose_scale_float8, hp_value_lb=1e-12)",
            differs="compressed-tensors (FP8_DYNAMIC) divides in the input dtype (bf16) and has no lower bound; "
            "vLLM per-token clamps the scale at 1/(448*512) and multiplies by its reciprocal",
        ),
        Format(
            "fp8_e4m3_g128",
            E4M3,
            (128,),
            _CT_FP8,
            "FP8 E4M3, one amax/448 scale per 1x128 group (DeepSeek-V3 activations)",
            library=_CT,
            differs="vLLM per_token_group_quant_fp8 computes in fp32 with amax >= 1e-10; with use_ue8m0 "
            "(DeepGEMM) it rounds the scale up to a power of two: fp8_e4m3_g128_ue8m0",
        ),
        Format(
            "fp8_e4m3_b128",
            E4M3,
            (128, 128),
            _CT_FP8,
            "FP8 E4M3, one amax/448 scale per 128x128 weight tile (DeepSeek-V3 weights; weights only)",
            library=_CT,
            differs="DeepSeek-V3's reference weight_quant has no minimum scale and computes in fp32",
        ),
        Format(
            "fp8_e4m3_g128_ue8m0",
            E4M3,
            (128,),
            AmaxScale(
                "ue8m0 ceil(amax/448), fp32",
                448.0,
                1e-10,
                "amax",
                scale_dtype="float32",
                storage_dtype="float32",
                power_of_two=True,
                bits=8,
            ),
            "FP8 E4M3 1x128 groups, scale rounded up to a power of two (DeepGEMM UE8M0, vLLM use_ue8m0)",
            library="vLLM fp8_utils._per_token_group_quant_fp8 with use_ue8m0 (plain-Python reference)",
            differs="fp8_e4m3_g128 keeps the real-valued scale",
        ),
        Format(
            "int8_row",
            INT8_CODES,
            (),
            _TORCHAO_INT8,
            "INT8 symmetric, amax/127.5 on [-128, 127] per row (per output channel / per token)",
            whole="row",
            library=_TORCHAO_INT8_LIB,
            differs=_INT8_DIFFERS,
        ),
        Format(
            "int8_tensor",
            INT8_CODES,
            (),
            _TORCHAO_INT8,
            "INT8 symmetric, amax/127.5 on [-128, 127] per tensor (static at activations: calibrated)",
            whole="tensor",
            library=_TORCHAO_INT8_LIB,
            differs=_INT8_DIFFERS,
        ),
        Format(
            "int8_row_vllm",
            INT8_CODES,
            (),
            AmaxScale(
                "amax/127, fp32, x*(127/amax)",
                127.0,
                0.0,
                "amax",
                scale_dtype="float32",
                storage_dtype="float32",
                apply="inverse_amax",
            ),
            "INT8 per row as vLLM's kernels: scale amax/127, elements rint(x * 127/amax), saturated",
            whole="row",
            library="vLLM csrc/quantization/compressed_tensors/int8_quant_kernels.cu "
            "dynamic_scaled_int8_quant_kernel (plain-Python reference)",
            differs="int8_row (torchao, compressed-tensors) uses amax/127.5 and divides; ModelOpt also uses amax/127",
        ),
        Format(
            "int4_g128",
            INT4,
            (128,),
            AmaxScale("amax/7.5 (compressed-tensors)", 7.5, "eps", "zero", bits=16, adds_zero=True),
            "INT4 symmetric, amax/7.5 on [-8, 7] per group of 128 (GPTQ-style weight-only)",
            library=_CT,
            differs="AutoAWQ and ModelOpt use amax/7 on [-7, 7]",
        ),
        Format(
            "int4_g128_asym",
            INT4,
            (128,),
            AmaxScale("(max-min)/15 + zero point (compressed-tensors)", 15.0, "eps", "zero", asymmetric=True, bits=16),
            "INT4 with a zero point, (max(x,0)-min(x,0))/15 per group of 128, rounded zero point",
            library=_CT,
            differs="AutoAWQ does not round the zero point into the code range the same way (zero kept real)",
        ),
    ),
)


def list_formats() -> list[str]:
    """Names of every registered format, in registry order."""
    return FORMATS.names()


def get_format(name: str) -> Format:
    """The registry entry for ``name``; :class:`harness.vocab.UnknownName` (a ValueError) naming
    the valid formats otherwise."""
    return FORMATS.get(name)
