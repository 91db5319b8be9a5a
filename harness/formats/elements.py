"""Element data types of the OCP Microscaling (MX) v1.0 spec and exact fp32 bit helpers.

Every element type is a sign-magnitude minifloat ``(-1)^s * 2^(e - bias) * 1.m`` with
subnormals ``(-1)^s * 2^(1 - bias) * 0.m`` and no Inf encodings (OCP MX v1.0 §5.3;
FP8 E4M3 is the OCP "fn" variant with max 448).  MXINT8's element (§5.4: two's complement
``k * 2**-6``, ``|k| <= 127``) has exactly the values of the minifloat with 1 exponent bit,
6 mantissa bits and bias 1 (subnormals ``0..63 * 2**-6``, normals ``64..127 * 2**-6``: one step
``2**-6`` throughout), so it shares the rounding; only its bit encoding differs.
All arithmetic here is on fp32 tensors and exact: scalings are by powers of two built from
bits, rounding is ``torch.round`` (ties to even).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP32_MANTISSA_BITS = 23
FP32_EXPONENT_BIAS = 127
FP32_EXPONENT_MASK = 0x7F800000


@dataclass(frozen=True)
class ElementFormat:
    """A minifloat element type: ``ebits`` exponent bits, ``mbits`` mantissa bits, exponent
    ``bias`` and the largest finite magnitude ``max_value`` (saturation bound)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_value: float
    twos_complement: bool = False  # codes are the integer k of k * 2**(emin - mbits), not sign|e|m

    @property
    def bits(self) -> int:
        """Storage bits of one element, sign included."""
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value, ``1 - bias``; subnormals share it."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """``floor(log2(max_value))``: the ``emax_elem`` of the MX shared-scale formula."""
        return math.frexp(self.max_value)[1] - 1

    def grid(self) -> list[float]:
        """All non-negative representable values, ascending (for tests and docs)."""
        sub = [m * 2.0 ** (self.emin - self.mbits) for m in range(2**self.mbits)]
        normal = [
            (2**self.mbits + m) * 2.0 ** (e - self.mbits)
            for e in range(self.emin, self.emax + 1)
            for m in range(2**self.mbits)
        ]
        return sorted(v for v in sub + normal if v <= self.max_value)


E2M1 = ElementFormat("e2m1", ebits=2, mbits=1, bias=1, max_value=6.0)
E2M3 = ElementFormat("e2m3", ebits=2, mbits=3, bias=1, max_value=7.5)
E3M2 = ElementFormat("e3m2", ebits=3, mbits=2, bias=3, max_value=28.0)
E4M3 = ElementFormat("e4m3", ebits=4, mbits=3, bias=7, max_value=448.0)
E5M2 = ElementFormat("e5m2", ebits=5, mbits=2, bias=15, max_value=57344.0)
INT8 = ElementFormat("int8", ebits=1, mbits=6, bias=1, max_value=127 / 64, twos_complement=True)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2(|x|))`` of fp32 values read from the IEEE-754 exponent field (int32).

    Exact for normal numbers (a float ``log2`` rounds up just below powers of two); zero and
    subnormals give -127 and Inf/NaN give 128, which callers clamp or mask.
    """
    return ((x.view(torch.int32) >> FP32_MANTISSA_BITS) & 0xFF) - FP32_EXPONENT_BIAS


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0**e`` in fp32 for integer ``e`` in [-149, 127], built from bits
    (subnormal powers included, so a 2**-127 scale stays 2**-127)."""
    e = e.to(torch.int32)
    normal = (e + FP32_EXPONENT_BIAS).clamp(min=1) << FP32_MANTISSA_BITS
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, FP32_MANTISSA_BITS - 1)
    return torch.where(e >= 1 - FP32_EXPONENT_BIAS, normal, subnormal).view(torch.float32)


def round_to_grid(
    v: torch.Tensor,
    elem: ElementFormat,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round finite fp32 ``v`` onto ``elem``'s grid, then saturate to ``±max_value``.

    Deterministic: to nearest, ties to even.  With ``noise`` (uniform [0, 1) draws of ``v``'s
    shape) it rounds stochastically: up to the next grid point with probability equal to the
    distance from the one below, in units of the grid step, which is unbiased.  Inf and NaN
    give NaN (the callers turn such a whole block into NaN anyway).  Two's-complement elements
    have no -0: their zeros are +0 (so fake quantization equals decoding the codes).
    """
    a = v.abs()
    # 2**floor(log2|v|) by masking the exponent field (0 for subnormals, Inf for Inf/NaN);
    # values below 2**emin share the subnormal step 2**(emin - mbits).
    binade = (a.view(torch.int32) & FP32_EXPONENT_MASK).view(torch.float32)
    step = binade.clamp(min=2.0**elem.emin) * 2.0**-elem.mbits
    t = a / step  # exact: division by a power of two
    if noise is None:
        n = torch.round(t)  # round half to even
    else:
        n = torch.floor(t)
        n = n + (noise < (t - n)).to(n.dtype)
    q = torch.copysign((n * step).clamp(max=elem.max_value), v)
    return q + 0.0 if elem.twos_complement else q  # -0.0 + 0.0 == +0.0


def encode(q: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Bit codes (uint8, ``sign | exponent | mantissa``, or the two's-complement integer ``k`` of
    ``k * 2**(emin - mbits)``) of fp32 values already on the grid."""
    if elem.twos_complement:
        return (q * 2.0 ** (elem.mbits - elem.emin)).to(torch.int32).to(torch.int8).view(torch.uint8)
    a = q.abs()
    e = floor_log2(a).clamp(min=elem.emin)
    normal = a >= 2.0**elem.emin
    significand = (a / exp2_int(e - elem.mbits)).to(torch.int32)
    exponent_field = torch.where(normal, e + elem.bias, 0)
    mantissa = significand - torch.where(normal, 2**elem.mbits, 0)
    sign = torch.signbit(q).to(torch.int32)
    code = (sign << (elem.ebits + elem.mbits)) | (exponent_field << elem.mbits) | mantissa
    return code.to(torch.uint8)


def decode(codes: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """fp32 values of ``elem`` bit codes (inverse of :func:`encode`)."""
    if elem.twos_complement:
        return codes.view(torch.int8).to(torch.float32) * 2.0 ** (elem.emin - elem.mbits)
    c = codes.to(torch.int32)
    mantissa = c & ((1 << elem.mbits) - 1)
    exponent_field = (c >> elem.mbits) & ((1 << elem.ebits) - 1)
    normal = exponent_field > 0
    significand = torch.where(normal, mantissa + (1 << elem.mbits), mantissa)
    exponent = torch.where(normal, exponent_field - elem.bias, elem.emin)
    magnitude = significand.to(torch.float32) * exp2_int(exponent - elem.mbits)
    sign = (c >> (elem.ebits + elem.mbits)) & 1
    return torch.where(sign.bool(), -magnitude, magnitude)
