"""Formats with a real-valued scale (``amax / qmax``) per row, group, tile or tensor: FP8 E4M3
and signed-integer elements, symmetric or with a zero point, as the deployed libraries compute them.

One rule, parameterised by the places where the libraries differ (:class:`AmaxScale`):

- the range: ``amax = max |x|`` of the group (symmetric), or ``lo = min(min x, 0)``,
  ``hi = max(max x, 0)`` with ``scale = (hi - lo) / divisor`` and zero point
  ``zp = round(clamp(qmin - lo / scale, qmin, qmax))`` (asymmetric, compressed-tensors'
  ``calculate_qparams``);
- the divisor: ``qmax`` of the element (448 for E4M3, 127 / 7 in vLLM and AutoAWQ) or half the
  integer range (127.5 / 7.5 in torchao's ``choose_qparams_affine`` and compressed-tensors);
- the named minimum and where it applies: amax clamped from below before the division (torchao
  float8 ``hp_value_lb``, vLLM's ``eps``), the scale clamped from below (torchao
  ``choose_qparams_affine``'s ``eps``) or only zero scales replaced (compressed-tensors);
- the dtype the scale is computed in and stored in (the input's, as compressed-tensors and
  torchao compute ``amax / divisor``; fp32 as vLLM's kernels), which is also the dtype of
  ``x / scale`` and of the dequantization ``(q - zp) * scale`` (torch's type promotion);
- how ``x`` meets the scale: divided by it, multiplied by ``1 / scale`` (torchao
  ``quantize_affine``) or by ``divisor / amax`` (vLLM ``dynamic_scaled_int8_quant``);
- optionally the scale rounded up to a power of two (UE8M0, DeepGEMM / vLLM ``use_ue8m0``).

Elements are then clamped to ``[qmin, qmax]`` and rounded half to even (integers) or to the
nearest E4M3 value (ties to even, as torch's ``float8_e4m3fn`` cast of a clamped value).
A group holding NaN or Inf becomes NaN, as in the block formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.formats.elements import (
    FP32_MANTISSA_BITS,
    ElementFormat,
    decode,
    encode,
    exp2_int,
    floor_log2,
    round_to_grid,
)

SCALE_DTYPES = ("input", "float32")
MINIMUM_RULES = ("amax", "scale", "zero")
APPLY_RULES = ("divide", "reciprocal", "inverse_amax")


@dataclass(frozen=True)
class IntElement:
    """A signed two's-complement integer element: codes ``qmin..qmax`` (no implicit factor)."""

    name: str
    bits: int
    qmin: int
    qmax: int
    twos_complement: bool = True

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    @property
    def mbits(self) -> int:
        """Bits below the sign: the resolution a signed integer of ``bits`` bits has."""
        return self.bits - 1

    def grid(self) -> list[float]:
        """The magnitudes of all codes, ascending (``-qmin`` included)."""
        return [float(k) for k in range(0, max(-self.qmin, self.qmax) + 1)]


INT4 = IntElement("int4", bits=4, qmin=-8, qmax=7)
INT8_CODES = IntElement("int8", bits=8, qmin=-128, qmax=127)


@dataclass(frozen=True)
class AmaxScale:
    """A real-valued scale ``amax / divisor`` (or ``(hi - lo) / divisor`` with a zero point).

    ``minimum`` applies per ``minimum_rule`` (:data:`MINIMUM_RULES`: ``amax`` clamps the range
    from below before dividing, ``scale`` clamps the scale, ``zero`` replaces zero scales only);
    ``scale_dtype`` / ``storage_dtype`` (:data:`SCALE_DTYPES`) are where ``amax / divisor`` is
    computed and the dtype it is then kept in; ``apply`` (:data:`APPLY_RULES`) how ``x`` meets it;
    ``power_of_two`` rounds the scale up to ``2**ceil(log2 s)`` (UE8M0); ``static`` scales are
    fixed at calibration for activations (per tensor); ``asymmetric`` adds a zero point."""

    name: str
    divisor: float
    minimum: float | str  # "eps": torch.finfo(storage dtype).eps
    minimum_rule: str
    scale_dtype: str = "input"
    storage_dtype: str = "input"
    apply: str = "divide"
    power_of_two: bool = False
    asymmetric: bool = False
    adds_zero: bool = False  # a symmetric zero point of 0 is still added (compressed-tensors): -0 -> +0
    bits: int = 32
    mode: str = "floor"  # no E8M0 rule: only the default is accepted
    supports_per_tensor_scale: bool = False

    def with_mode(self, mode: str) -> AmaxScale:
        if mode != "floor":
            raise ValueError(
                f"scale_mode {mode!r} applies to E8M0 (MX) scales only; a {self.name} scale has one rule "
                "(valid scale_mode here: floor, the default)"
            )
        return self


Element = ElementFormat | IntElement


def _dtype(rule: str, x_dtype: torch.dtype) -> torch.dtype:
    return x_dtype if rule == "input" else torch.float32


def _ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """``2**ceil(log2 s)`` of positive normal fp32 ``s``, exactly (from the bits)."""
    bits = s.view(torch.int32)
    inexact = ((bits & ((1 << FP32_MANTISSA_BITS) - 1)) != 0).to(torch.int32)
    return exp2_int((floor_log2(s) + inexact).clamp(-126, 127))


def qparams(
    groups: torch.Tensor, elem: Element, scale: AmaxScale, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(scale, zero point or None, multiplier input)`` of every group (last dim) of ``groups``
    (in the input's dtype).  ``amax`` (a calibrated range, broadcastable) replaces the groups' own."""
    x_dtype = groups.dtype
    sdt, store = _dtype(scale.scale_dtype, x_dtype), _dtype(scale.storage_dtype, x_dtype)
    zp = None
    if scale.asymmetric:
        lo = groups.amin(-1, keepdim=True).clamp(max=0).to(sdt)
        hi = groups.amax(-1, keepdim=True).clamp(min=0).to(sdt)
        s = (hi - lo) / scale.divisor
        # Near the dtype's max hi - lo overflows (Inf there in compressed-tensors): split the division.
        s = torch.where(torch.isinf(s) & torch.isfinite(hi - hi), hi / scale.divisor - lo / scale.divisor, s)
        zp = torch.round((elem.qmin - lo / s).clamp(elem.qmin, elem.qmax))
        zp = torch.nan_to_num(zp, nan=0.0)  # an all-zero group: 0 / 0, which compressed-tensors' int8 cast makes 0
        top = hi
    else:
        top = groups.abs().amax(-1, keepdim=True) if amax is None else amax.to(x_dtype)
        top = top.to(sdt)
        if scale.minimum_rule == "amax" and scale.minimum:
            top = top.clamp(min=scale.minimum)
        s = top / scale.divisor
    if scale.minimum_rule == "scale":
        s = s.clamp(min=scale.minimum)
    s = s.to(store)
    if scale.minimum_rule in ("amax", "scale") and scale.minimum:
        # fp16 cannot hold 1e-12 (it flushes to 0, and 0 / 0 would be NaN): there the minimum applies in fp32.
        least = scale.minimum / (scale.divisor if scale.minimum_rule == "amax" else 1.0)
        s = torch.where(s == 0, torch.tensor(least, dtype=torch.float32).to(store), s)
    if scale.power_of_two:
        s = _ceil_pow2(s.float()).to(store)
    if scale.minimum_rule == "zero":
        eps = torch.finfo(store).eps if scale.minimum == "eps" else scale.minimum
        s = torch.where(s == 0, torch.tensor(eps, dtype=store, device=s.device), s)
    return s, zp, top


def operand(s: torch.Tensor, top: torch.Tensor, scale: AmaxScale) -> tuple[torch.Tensor, bool]:
    """What ``x`` meets (:func:`qparams`' scale ``s`` and range ``top``) and whether it divides
    ``x`` (else multiplies it; the product's dtype is torch's promotion of the two): the scale,
    ``1 / scale`` (torchao ``quantize_affine``) or vLLM's ``divisor / amax``, an IEEE fp32 division
    (torch's ``scalar / tensor`` is a reciprocal times the scalar, not a division)."""
    if scale.apply == "divide":
        return s, True
    if scale.apply == "reciprocal":
        return 1.0 / s, False
    return torch.full_like(top, scale.divisor, dtype=torch.float32) / top.float(), False


def quantize_groups(
    groups: torch.Tensor, elem: Element, scale: AmaxScale, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Element values (fp32: integers, or E4M3 grid values), scales (storage dtype) and zero
    points (fp32 integers or None) of ``groups`` (input dtype, groups along the last dim)."""
    s, zp, top = qparams(groups, elem, scale, amax)
    m, divide = operand(s, top, scale)
    v = groups / m if divide else groups * m
    if scale.apply == "inverse_amax":  # 0 * inf = NaN, which PTX cvt.rni.sat makes 0
        v = torch.nan_to_num(v, nan=0.0)
    if zp is not None:
        v = v + zp.to(v.dtype)
    elif scale.adds_zero:
        v = v + 0.0
    v = v.float()
    if isinstance(elem, IntElement):
        q = torch.round(v.clamp(elem.qmin, elem.qmax)) + 0.0  # integers have no -0
    else:
        q = round_to_grid(v.clamp(-elem.max_value, elem.max_value), elem)
    return q, s, zp


def dequantize_groups(q: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(q - zp) * scale`` in the scale's dtype (codes and zero points are exact there), in
    ``dtype``, saturated to its largest finite magnitude: near the dtype's maximum a code beyond
    ``divisor`` (-128 of amax/127.5, -8 of amax/7.5) times the scale would overflow to Inf, where
    the libraries return Inf; every other value is theirs bit for bit."""
    v = q.to(s.dtype)
    if zp is not None:
        v = v - zp.to(s.dtype)
    top = torch.finfo(dtype).max
    return (v * s).clamp(-top, top).to(dtype)


def encode_elements(q: torch.Tensor, elem: Element) -> torch.Tensor:
    """uint8 codes of element values: the integer's two's-complement byte (int4: its low nibble),
    or the E4M3 bits."""
    if isinstance(elem, IntElement):
        codes = q.to(torch.int32).to(torch.int8).view(torch.uint8)
        return codes & 0xF if elem.bits == 4 else codes
    return encode(q, elem)


def decode_elements(codes: torch.Tensor, elem: Element) -> torch.Tensor:
    """fp32 values of :func:`encode_elements`'s codes (int4 codes are sign-extended nibbles)."""
    if isinstance(elem, IntElement):
        c = codes.to(torch.int32)
        if elem.bits == 4:
            c = torch.where(c >= 8, c - 16, c)
        else:
            c = codes.view(torch.int8).to(torch.int32)
        return c.to(torch.float32)
    return decode(codes, elem)
