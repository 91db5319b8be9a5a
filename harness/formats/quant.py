"""Fake quantization (quantize-dequantize in one step) and real quantization to packed codes.

Semantics: OCP Microscaling Formats v1.0 and torchao's ``MXTensor.to_mx(..., scaling_mode)`` /
``NVFP4Tensor`` (``scale_mode=`` picks the E8M0 rule, ``harness.formats.scales.SCALE_MODES``),
except where torchao departs from the spec (a 2**-127 scale is applied as
2**-127, and NaN or Inf anywhere in a block makes exactly that block NaN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from harness.formats import affine, fast, philox
from harness.formats.blocks import BlockLayout
from harness.formats.elements import E4M3, decode, encode, round_to_grid
from harness.formats.registry import FORMATS, Format, get_format
from harness.formats.scales import E8M0Scale
from harness.vocab import Vocab

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# NVFP4's largest magnitude per unit of per-tensor scale: E4M3 block scale max times E2M1 max (448 * 6).
NVFP4_RANGE = E4M3.max_value * FORMATS["nvfp4"].element.max_value
# The per-tensor scales p for which the two-level NVFP4 recipe is finite in fp32: the smallest
# dequantization scale p * 2**-6 (E4M3's smallest normal block scale) is a normal fp32 number,
# so 1 / p and the multiplier (1 / p) / s stay finite; the largest value, 6 * 448 * p, is finite.
PER_TENSOR_SCALE_MIN = 2.0 ** (-126 - E4M3.emin)
PER_TENSOR_SCALE_MAX = torch.finfo(torch.float32).max / NVFP4_RANGE


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor in a block format: element ``codes`` and block ``scales``.

    ``codes`` (uint8) has shape ``layout.blocks_shape`` (4-bit codes packed two per byte, element
    ``2i`` in the low nibble as torchao packs; FP6, FP8 and INT8 one per byte).  ``scales`` has one
    entry per block: the biased E8M0 exponent (255 = NaN) or the E4M3 bits (0x7F = NaN), uint8;
    for real-valued scales (:mod:`harness.formats.affine`) the scale itself, in its storage dtype
    (NaN for blocks holding NaN or Inf), with the integer ``zero_points`` (int8) when asymmetric.
    """

    format: str
    codes: torch.Tensor
    scales: torch.Tensor
    layout: BlockLayout
    shape: tuple[int, ...]
    dtype: torch.dtype
    per_tensor_scale: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.numel()
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size() + zp


def _check_input(
    x: torch.Tensor, fmt: Format, axis: int, per_tensor_scale: float | torch.Tensor | None
) -> tuple[BlockLayout, torch.Tensor | None]:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        valid = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"{fmt.name}: dtype {x.dtype} is not supported; valid dtypes: {valid}")
    ndim = x.dim()
    if len(fmt.block_shape) == 2:
        if ndim < 2:
            raise ValueError(
                f"{fmt.name} quantizes {'x'.join(map(str, fmt.block_shape))} tiles of the last two dims and needs "
                f"a tensor of at least 2 dims; got a {ndim}-D tensor of shape {tuple(x.shape)}"
            )
        if axis != -1:
            raise ValueError(f"{fmt.name} always tiles the last two dims; axis={axis} is not valid (use -1)")
    elif not -max(ndim, 1) <= axis < max(ndim, 1):
        raise ValueError(
            f"axis {axis} is out of range for a {ndim}-D tensor; valid axes: {-max(ndim, 1)}..{max(ndim, 1) - 1}"
        )
    scale = None
    if per_tensor_scale is not None:
        if not fmt.scale.supports_per_tensor_scale:
            with_pts = [f.name for f in FORMATS.values() if f.scale.supports_per_tensor_scale]
            raise ValueError(
                f"per_tensor_scale is not used by {fmt.name} (scale {fmt.scale.name}); "
                f"formats with a per-tensor scale: {', '.join(with_pts)}"
            )
        scale = torch.as_tensor(per_tensor_scale, dtype=torch.float32, device=x.device)
        if scale.numel() != 1 or not bool(((scale >= PER_TENSOR_SCALE_MIN) & (scale <= PER_TENSOR_SCALE_MAX)).all()):
            raise ValueError(
                "per_tensor_scale must be one finite positive number in "
                f"[{PER_TENSOR_SCALE_MIN:.4g}, {PER_TENSOR_SCALE_MAX:.4g}] (where the two-level NVFP4 recipe "
                f"stays finite), got {per_tensor_scale!r}"
            )
        scale = scale.reshape(())
    shape = tuple(x.shape) if ndim else (1,)
    axis, block_shape = axis % len(shape), fmt.block_shape
    if fmt.whole == "row":
        block_shape = (max(shape[axis], 1),)
    elif fmt.whole == "tensor":
        shape, axis = (x.numel(),), 0
        block_shape = (max(x.numel(), 1),)
    return BlockLayout(shape, block_shape, axis), scale


def _quantize_blocks(
    blocks: torch.Tensor,
    fmt: Format,
    per_tensor_scale: torch.Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid values (fp32) and stored block scales (fp32, NaN for blocks holding NaN or Inf)."""
    amax = blocks.abs().amax(-1, keepdim=True)
    stored, multiplier = fmt.scale.block_scale(amax, fmt.element, per_tensor_scale)
    noise = None
    if fmt.stochastic:
        noise = philox.uniform(tuple(blocks.shape), philox.draw_seed(generator, blocks.device), blocks.device)
    q = round_to_grid(blocks * multiplier, fmt.element, noise)
    if isinstance(fmt.scale, E8M0Scale) and fmt.scale.mode != "floor":
        q = _saturate_overflow(q, multiplier, fmt, dtype)
    stored = torch.where(torch.isfinite(amax), stored, torch.nan)
    return q, stored


def _saturate_overflow(q: torch.Tensor, multiplier: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """Codes clamped to the largest grid value whose product with the block's scale is finite in
    ``dtype``: near the dtype's max the ceil, even and rceil rules pick a scale one binade above
    floor's, where the top codes would overflow to Inf (torchao returns Inf there); every other
    code is unchanged.  (``floor`` never overflows: ``max_value * 2**(floor(log2 amax) - emax)``
    is below ``2**(floor(log2 amax) + 1)``.)"""
    reach = (torch.finfo(dtype).max * multiplier).clamp(max=fmt.element.max_value)
    limit = round_to_grid(reach, fmt.element, torch.ones_like(reach))  # round down onto the grid
    return torch.maximum(torch.minimum(q, limit), -limit)


def _finite_groups(groups: torch.Tensor) -> torch.Tensor:
    """Per group (keepdim): no NaN or Inf in it (otherwise the whole group is NaN)."""
    return torch.isfinite(groups.abs().amax(-1, keepdim=True))


def _check_calibrated(fmt: Format, amax: float | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A static per-tensor range, as a finite non-negative fp32 scalar on ``x``'s device."""
    if amax is None:
        return None
    if fmt.grouping != "tensor":
        tensor_formats = [f.name for f in FORMATS.values() if f.grouping == "tensor"]
        raise ValueError(
            f"calibrated_amax is for per-tensor formats ({', '.join(tensor_formats)}), not {fmt.name} "
            f"({fmt.grouping} scales)"
        )
    value = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if value.numel() != 1 or not bool(torch.isfinite(value).all() and (value >= 0).all()):
        raise ValueError(f"calibrated_amax must be one finite non-negative number, got {amax!r}")
    return value.reshape(1, 1)


def _dequant_scale(stored: torch.Tensor, per_tensor_scale: torch.Tensor | None) -> torch.Tensor:
    return stored if per_tensor_scale is None else per_tensor_scale * stored


def _format(name: str, scale_mode: str) -> Format:
    """The registry entry ``name`` under E8M0 rule ``scale_mode`` (ValueError on bad names)."""
    return get_format(name).with_scale_mode(scale_mode)


def _prepare(
    x: torch.Tensor,
    name: str,
    axis: int,
    per_tensor_scale: float | torch.Tensor | None,
    scale_mode: str,
    backend: str | None = "reference",
    codes: bool = False,
) -> tuple[Format, BlockLayout, torch.Tensor | None, bool]:
    """The format under ``scale_mode``, the block layout, the per-tensor scale (validated) and
    whether ``backend`` (None: the current default, :func:`default_backend`) takes a fast kernel
    (``codes``: for :func:`quantize`'s codes and scales, not ``fake_quantize``'s values)."""
    backend = Backend.parse(backend) if backend is not None else _default_backend[-1]
    fmt = _format(name, scale_mode)
    layout, pts = _check_input(x, fmt, axis, per_tensor_scale)
    return fmt, layout, pts, _takes_fast_path(x, fmt, backend, codes)


def _blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``x`` in fp32 cut into ``layout``'s blocks (detached: no autograd through rounding)."""
    return layout.split(x.detach().reshape(layout.shape).to(torch.float32))


class Backend(Vocab, kind="backend"):
    """Which implementation of a format :func:`fake_quantize` and :func:`quantize` run."""

    AUTO = "auto"  # a fast kernel where one takes the format and tensor, else the reference
    REFERENCE = "reference"  # the plain-PyTorch reference path (the oracle the kernels match bit for bit)
    FAST = "fast"  # a fast kernel (C on CPU, Triton on CUDA); ValueError where none takes the case


BACKENDS = Backend.choices()
_default_backend = [Backend.AUTO]


def _takes_fast_path(x: torch.Tensor, fmt: Format, backend: str, codes: bool = False) -> bool:
    """Whether ``backend`` (resolved) runs ``fmt`` on validated ``x`` on a fast kernel (``codes``:
    real quantization, which the real-valued-scale formats have no kernel for); ValueError when
    ``backend="fast"`` and no kernel can."""
    if backend == "reference" or x.dim() == 0 or x.numel() == 0:
        return False
    why_not = fast.supports(fmt, x)
    if codes and not fmt.microscaling:
        why_not = why_not or "its real quantization (codes + scales) has no kernel, only fake_quantize has"
    if why_not and backend == "fast":
        raise ValueError(f"backend='fast' cannot run {fmt.name} here: {why_not}")
    return not why_not


@contextlib.contextmanager
def default_backend(backend: str) -> Iterator[None]:
    """Within the block, ``fake_quantize`` and ``quantize`` calls without ``backend=`` use
    ``backend`` (the formats suite runs every case under ``"fast"`` and under ``"reference"``)."""
    _default_backend.append(Backend.parse(backend))
    try:
        yield
    finally:
        _default_backend.pop()


def fake_quantize(
    x: torch.Tensor,
    name: str,
    *,
    axis: int = -1,
    generator: torch.Generator | None = None,
    per_tensor_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
    scale_mode: str = "floor",
    calibrated_amax: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` quantized to format ``name`` and dequantized: same shape and dtype, computed in fp32.

    Blocks run along ``axis`` (``mxfp4_2d``: 32x32 tiles of the last two dims).  ``generator``
    drives ``mxfp4_sr`` (same seed, same output; None uses torch's default generator) and is
    ignored by deterministic formats.  ``per_tensor_scale`` is NVFP4's optional second level
    (see :func:`nvfp4_per_tensor_scale`).  ``scale_mode``: the E8M0 shared-exponent rule,
    ``floor`` (OCP, default), ``ceil``, ``even`` or ``rceil`` (torchao's ``ScaleCalculationMode``,
    :data:`harness.formats.scales.SCALE_MODES`; E4M3-scaled NVFP4 takes ``floor`` only).
    ``backend``: ``"auto"`` takes the bit-identical fast path (:mod:`harness.formats.fast`)
    where it applies, ``"reference"`` the tensor-op path here, ``"fast"`` insists on the fast
    path; None: ``"auto"`` unless :func:`default_backend` says otherwise.  ``x`` is never modified.

    Real-valued-scale formats (FP8 / INT8 / INT4 per row, group, tile or tensor,
    :mod:`harness.formats.affine`) compute in the dtypes their library does (``Format.library``),
    not in fp32; ``calibrated_amax`` (``tensor`` formats only) fixes the range of a static scale.

    The output is detached from autograd (no gradient flows through rounding): to train through
    it, use :class:`harness.inject.QuantInjector` with ``straight_through=True`` (or
    ``harness.inject.StraightThrough.apply(x, fake_quantize(x, ...))``).
    """
    fmt, layout, pts, on_kernel = _prepare(x, name, axis, per_tensor_scale, scale_mode, backend)
    amax = _check_calibrated(fmt, calibrated_amax, x)
    if on_kernel:
        return fast.fake_quantize_fast(x, fmt, layout.axis, pts, generator, calibrated_amax=amax)
    if not fmt.microscaling:
        groups = layout.split(x.detach().reshape(layout.shape))
        if groups.numel() == 0:
            return x.clone()
        q, s, zp = affine.quantize_groups(groups, fmt.element, fmt.scale, amax)
        out = torch.where(_finite_groups(groups), affine.dequantize_groups(q, s, zp, x.dtype), torch.nan)
        return layout.merge(out).reshape(x.shape).to(x.dtype).contiguous()
    blocks = _blocks(x, layout)
    if blocks.numel() == 0:
        return x.clone()
    q, stored = _quantize_blocks(blocks, fmt, pts, generator, x.dtype)
    out = layout.merge(q * _dequant_scale(stored, pts))
    return out.reshape(x.shape).to(x.dtype).contiguous()


def quantize(
    x: torch.Tensor,
    name: str,
    *,
    axis: int = -1,
    generator: torch.Generator | None = None,
    per_tensor_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
    scale_mode: str = "floor",
    calibrated_amax: float | torch.Tensor | None = None,
) -> QuantizedTensor:
    """Real quantization: packed uint8 element codes plus E8M0 or E4M3 block scales.

    ``dequantize(quantize(x, ...))`` equals ``fake_quantize(x, ...)`` bit for bit (the scale
    mode only chooses the stored scales, so dequantization needs no mode).  ``backend`` as in
    :func:`fake_quantize`: the fast kernels write the same codes and scales as the reference path.
    """
    fmt, layout, pts, on_kernel = _prepare(x, name, axis, per_tensor_scale, scale_mode, backend, codes=True)
    amax = _check_calibrated(fmt, calibrated_amax, x)
    if not fmt.microscaling:
        groups = layout.split(x.detach().reshape(layout.shape))
        q, s, zp = affine.quantize_groups(groups, fmt.element, fmt.scale, amax)
        finite = _finite_groups(groups)
        codes = affine.encode_elements(torch.where(finite, q, 0.0), fmt.element)
        if fmt.element.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales = torch.where(finite, s, torch.nan).squeeze(-1)
        zps = None if zp is None else zp.squeeze(-1).to(torch.int8)
        return QuantizedTensor(fmt.name, codes, scales, layout, tuple(x.shape), x.dtype, None, zps)
    if on_kernel:
        codes, scale_codes = fast.quantize_fast(x, fmt, layout.axis, pts, generator)
        lead = layout.blocks_shape[:-1]
        codes, scale_codes = codes.reshape(*lead, codes.shape[-1]), scale_codes.reshape(lead)
        return QuantizedTensor(fmt.name, codes, scale_codes, layout, tuple(x.shape), x.dtype, pts)
    blocks = _blocks(x, layout)
    q, stored = _quantize_blocks(blocks, fmt, pts, generator, x.dtype)
    finite = ~torch.isnan(stored)
    codes = encode(torch.where(finite, q, 0.0), fmt.element)
    if fmt.element.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scale_codes = (
        torch.where(finite, fmt.scale.encode(torch.where(finite, stored, 1.0)), fmt.scale.nan_code)
        .squeeze(-1)
        .to(torch.uint8)
    )
    return QuantizedTensor(fmt.name, codes, scale_codes, layout, tuple(x.shape), x.dtype, pts)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The values a :class:`QuantizedTensor` stands for, in its original shape and dtype."""
    fmt = get_format(q.format)
    codes = q.codes
    if fmt.element.bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    if not fmt.microscaling:
        zp = None if q.zero_points is None else q.zero_points.unsqueeze(-1)
        out = affine.dequantize_groups(affine.decode_elements(codes, fmt.element), q.scales.unsqueeze(-1), zp, q.dtype)
        return q.layout.merge(out).reshape(q.shape).to(q.dtype).contiguous()
    scales = q.scales.unsqueeze(-1)
    stored = torch.where(scales == fmt.scale.nan_code, torch.nan, fmt.scale.decode(scales))
    out = q.layout.merge(decode(codes, fmt.element) * _dequant_scale(stored, q.per_tensor_scale))
    return out.reshape(q.shape).to(q.dtype).contiguous()


def representable_max(
    x: torch.Tensor,
    name: str,
    *,
    axis: int = -1,
    per_tensor_scale: float | torch.Tensor | None = None,
    scale_mode: str = "floor",
) -> torch.Tensor:
    """Per element of ``x`` (fp32, same shape): the largest magnitude its block can represent,
    ``element max_value * block scale`` (NaN for blocks holding NaN/Inf).  A value above it is
    clipped by the format: what SRDD's ``saturation_ratio`` counts."""
    fmt, layout, pts, _ = _prepare(x, name, axis, per_tensor_scale, scale_mode)
    if not fmt.microscaling:
        groups = layout.split(x.detach().reshape(layout.shape))
        s, zp, _ = affine.qparams(groups, fmt.element, fmt.scale)
        top = fmt.element.max_value - (0.0 if zp is None else zp.float())
        limit = torch.where(_finite_groups(groups), s.float() * top, torch.nan).expand(groups.shape)
        return layout.merge(limit).reshape(x.shape).contiguous()
    blocks = _blocks(x, layout)
    amax = blocks.abs().amax(-1, keepdim=True)
    stored, _ = fmt.scale.block_scale(amax, fmt.element, pts)
    stored = torch.where(torch.isfinite(amax), stored, torch.nan)
    limit = (_dequant_scale(stored, pts) * fmt.element.max_value).expand(blocks.shape)
    return layout.merge(limit).reshape(x.shape).contiguous()


def nvfp4_per_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's second-level fp32 scale ``amax(|x|) / (448 * 6)`` (torchao's recipe), so that
    the largest block scale lands on E4M3's maximum.  ``amax`` is over the finite values (NaN
    and Inf make their own blocks NaN anyway), and the result is clamped to
    [PER_TENSOR_SCALE_MIN, PER_TENSOR_SCALE_MAX]: an all-zero or tiny tensor gets the smallest
    usable scale instead of 0 or a scale whose reciprocal overflows."""
    finite = x.detach().to(torch.float32).nan_to_num(0.0, 0.0, 0.0).abs()
    amax = finite.amax() if finite.numel() else finite.new_zeros(())
    return (amax / NVFP4_RANGE).clamp(PER_TENSOR_SCALE_MIN, PER_TENSOR_SCALE_MAX)
