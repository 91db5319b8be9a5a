"""Block scale encodings: how a block's scale is derived from its amax, stored and read back.

``E8M0Scale`` is the OCP MX v1.0 shared exponent (§6.3, "minimally supported" FLOOR rule);
``E4M3Scale`` is NVFP4's FP8 block scale in torchao's convention.  Both return the *stored*
scale (what the codes hold) and the multiplier applied to ``x`` before rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.formats.elements import E4M3, ElementFormat, decode, encode, exp2_int, floor_log2, round_to_grid

E8M0_BIAS = 127
E8M0_NAN = 0xFF
E4M3_NAN = 0x7F  # S.1111.111 in OCP FP8 E4M3 ("fn": no Inf)


@dataclass(frozen=True)
class E8M0Scale:
    """Power-of-two scale ``2**(floor(log2(amax)) - emax_elem)``, exponent clamped to
    [-127, 127] and stored biased by 127 in one byte (255 encodes NaN)."""

    name: str = "e8m0"
    bits: int = 8
    nan_code: int = E8M0_NAN
    supports_per_tensor_scale: bool = False

    def block_scale(
        self, amax: torch.Tensor, elem: ElementFormat, per_tensor_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = (floor_log2(amax) - elem.emax).clamp(-E8M0_BIAS, E8M0_BIAS)
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
