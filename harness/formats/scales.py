"""Block scale encodings: how a block's scale is derived from its amax, stored and read back.

``E8M0Scale`` is the OCP MX v1.0 shared exponent (§6.3, "minimally supported" FLOOR rule, or
one of torchao's other ``ScaleCalculationMode`` rules, :data:`SCALE_MODES`);
``E4M3Scale`` is NVFP4's FP8 block scale in torchao's convention.  Both return the *stored*
scale (what the codes hold) and the multiplier applied to ``x`` before rounding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from harness.formats.elements import (
    E4M3,
    FP32_EXPONENT_MASK,
    FP32_MANTISSA_BITS,
    ElementFormat,
    decode,
    encode,
    exp2_int,
    floor_log2,
    round_to_grid,
)
from harness.vocab import Vocab

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F  # S.1111.111 in OCP FP8 E4M3 ("fn": no Inf)
FP32_MANTISSA_MASK = (1 << FP32_MANTISSA_BITS) - 1


class ScaleMode(Vocab, kind="scale_mode", plural="scale modes"):
    """E8M0 shared-exponent rules, torchao 0.18's ``ScaleCalculationMode`` (``mx_tensor.to_mx``)."""

    FLOOR = "floor"
    """OCP MX v1.0 §6.3, the default: ``floor(log2(amax)) - emax_elem``.  Clips the block max
    when ``amax / 2**floor(log2 amax)`` exceeds the element max's significand."""
    CEIL = "ceil"
    """``ceil(log2(amax)) - emax_elem`` (never clips; up to one binade coarser)."""
    EVEN = "even"
    """``floor(log2(amax rounded to mbits_elem mantissa bits, half up)) - emax_elem``: moves to
    the next binade exactly when the max would round past the element's top binade."""
    RCEIL = "rceil"
    """cuBLAS/Blackwell ``cvt.rp.satfinite.ue8m0``: ``ceil(log2(fp32(amax / max_elem)))``."""

    @property
    def code(self) -> ScaleCode:
        """The rule's code in the kernels' parameters (:class:`ScaleCode`)."""
        return ScaleCode[self.name]


SCALE_MODES = ScaleMode.choices()
"""Every :class:`ScaleMode` as its plain string, in order (the index is the kernels' :class:`ScaleCode`)."""

ScaleCode = enum.IntEnum("ScaleCode", {m.name: i for i, m in enumerate(ScaleMode)})
ScaleCode.__doc__ = """The E8M0 rule as the fast kernels take it (``scale_mode`` of ``fast_kernel.c``'s
``params_t``, ``SCALE_MODE`` of the Triton kernel): a rule's index in :data:`SCALE_MODES`."""


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(v))`` of finite fp32 ``v > 0`` from its bits (int32): ``floor_log2`` plus
    one unless ``v`` is a power of two.  Zero and subnormals give -127 (callers clamp there)."""
    bits = v.view(torch.int32)
    inexact = ((bits & FP32_MANTISSA_MASK) != 0).to(torch.int32)
    return torch.where((bits & FP32_EXPONENT_MASK) == 0, -E8M0_BIAS, floor_log2(v) + inexact)


def _shared_exponent(amax: torch.Tensor, elem: ElementFormat, mode: str) -> torch.Tensor:
    """The unclamped E8M0 exponent of blocks with max ``amax`` under scale ``mode`` (int32)."""
    if mode == "floor":
        return floor_log2(amax) - elem.emax
    if mode == "ceil":
        # torchao adds one when the mantissa bits are non-zero, subnormal amax included.
        bits = amax.view(torch.int32)
        return floor_log2(amax) + ((bits & FP32_MANTISSA_MASK) != 0).to(torch.int32) - elem.emax
    if mode == "even":
        # Round amax's mantissa half-up to the element's mbits (a carry bumps the exponent), then floor.
        bits = amax.view(torch.int32) + (1 << (FP32_MANTISSA_BITS - elem.mbits - 1))
        return floor_log2((bits & ~FP32_MANTISSA_MASK).view(torch.float32)) - elem.emax
    return _ceil_log2(amax / elem.max_value)  # rceil: fp32 division, as torchao and cuBLAS


@dataclass(frozen=True)
class E8M0Scale:
    """Power-of-two scale ``2**(shared exponent)`` (``floor(log2(amax)) - emax_elem`` under the
    default ``mode``, see :data:`SCALE_MODES`), exponent clamped to [-127, 127] and stored biased
    by 127 in one byte (255 encodes NaN)."""

    name: str = "e8m0"
    bits: int = 8
    nan_code: int = E8M0_NAN
    supports_per_tensor_scale: bool = False
    mode: str = "floor"

    def with_mode(self, mode: str) -> E8M0Scale:
        """This scale under shared-exponent rule ``mode``; ValueError naming the valid modes."""
        return replace(self, mode=ScaleMode.parse(mode))

    def block_scale(
        self, amax: torch.Tensor, elem: ElementFormat, per_tensor_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = _shared_exponent(amax, elem, self.mode).clamp(-E8M0_BIAS, E8M0_BIAS)
        # 2**-exponent is exact, so multiplying by it is dividing by the scale, 2**-127 included.
        return exp2_int(exponent), exp2_int(-exponent)

    def encode(self, scale: torch.Tensor) -> torch.Tensor:
        # 2**-127 is subnormal: floor_log2 reads -127 from its zero exponent field, code 0.
        return (floor_log2(scale) + E8M0_BIAS).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return exp2_int(codes.to(torch.int32) - E8M0_BIAS)


@dataclass(frozen=True)
class E4M3Scale:
    """NVFP4 block scale (torchao's ``nvfp4_quantize``): ``s = E4M3(clamp(amax / elem_max,
    2**-6, 448))`` rounded to nearest even, elements multiplied by ``fp32(1 / s)``.  With a
    per-tensor scale ``p`` the stored scale is ``E4M3(clamp(amax / elem_max / p, ...))``, the
    multiplier ``(1 / p) / s`` and the dequantization scale ``p * s``."""

    name: str = "e4m3"
    bits: int = 8
    nan_code: int = E4M3_NAN
    supports_per_tensor_scale: bool = True
    mode: str = "floor"  # the E4M3 scale has one rule; "floor" is accepted as the default

    def with_mode(self, mode: str) -> E4M3Scale:
        if mode != "floor":
            raise ValueError(
                f"scale_mode {mode!r} applies to E8M0 (MX) scales only; an E4M3 block scale is rounded to "
                f"nearest (valid scale_mode here: floor, the default; E8M0 modes: {', '.join(SCALE_MODES)})"
            )
        return self

    def block_scale(
        self, amax: torch.Tensor, elem: ElementFormat, per_tensor_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = amax / elem.max_value
        if per_tensor_scale is not None:
            raw = raw / per_tensor_scale
        stored = round_to_grid(raw.clamp(2.0**E4M3.emin, E4M3.max_value), E4M3)
        if per_tensor_scale is None:
            return stored, 1.0 / stored
        return stored, (1.0 / per_tensor_scale) / stored

    def encode(self, scale: torch.Tensor) -> torch.Tensor:
        return encode(scale, E4M3)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return decode(codes, E4M3)


ScaleFormat = E8M0Scale | E4M3Scale
