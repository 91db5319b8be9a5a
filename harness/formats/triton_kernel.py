"""The CUDA fast path of :func:`harness.formats.fake_quantize`: a Triton kernel with the C fast
path's arithmetic (``fast_kernel.c``: same formulas, same fp32 operation order), so GPU and CPU
results are bit-identical. Each program takes ``BLOCKS`` quantization blocks of a row-major
``(rows, row_len)`` fp32 tensor: one read, one write.

Rounding to nearest even uses ``(t + 2**23) - 2**23``, exact for the ``0 <= t < 2**(mbits+1)``
that element rounding produces; divisions by powers of two are exact multiplications, the others
use ``div_rn`` (IEEE round-to-nearest, not the fast approximate division). Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors: its parity is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from harness.formats.registry import Format
from harness.formats.scales import E8M0Scale

BLOCKS_PER_PROGRAM = 64


@triton.jit
def _exp2_int(e):
    """Exactly 2**e in fp32 for integer e in [-149, 127] (subnormal powers included)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.maximum(e + 149, 0)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, subnormal)


@triton.jit
def _round_to_grid(v, emin: tl.constexpr, mbits: tl.constexpr, max_value: tl.constexpr):
    """Round onto the element grid, ties to even, saturate, keep the sign. The grid step is
    2**k, k = max(floor_log2|v|, emin) - mbits, so ``|v| * 2**-k`` is exact (no division)."""
    bits = v.to(tl.int32, bitcast=True)
    a = (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    k = tl.maximum(((bits >> 23) & 0xFF) - 127, emin) - mbits
    t = a * _exp2_int(-k)
    n = (t + 8388608.0) - 8388608.0  # round half to even (fp32 RNE add)
    q = tl.minimum(n * _exp2_int(k), max_value)
    return (q.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _fake_quantize_kernel(
    x_ptr,
    out_ptr,
    n_blocks,
    row_len,
    per_tensor_scale,
    BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
    EMIN: tl.constexpr,
    MBITS: tl.constexpr,
    EMAX: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    E4M3_SCALE: tl.constexpr,
    HAS_PTS: tl.constexpr,
):
    blocks_per_row = (row_len + BLOCK - 1) // BLOCK
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    col = (b % blocks_per_row)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    offsets = (b // blocks_per_row)[:, None].to(tl.int64) * row_len + col
    mask = (b < n_blocks)[:, None] & (col < row_len)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    a = tl.abs(x)
    finite = tl.min(tl.where(a < float("inf"), 1, 0), axis=1) > 0  # NaN and Inf both fail a < inf
    amax = tl.max(tl.where(a < float("inf"), a, 0.0), axis=1)
    if E4M3_SCALE:
        raw = tl.math.div_rn(amax, MAX_VALUE)  # IEEE division, as on CPU
        if HAS_PTS:
            raw = tl.math.div_rn(raw, per_tensor_scale)
        raw = tl.minimum(tl.maximum(raw, 0.015625), 448.0)
        stored = _round_to_grid(raw, -6, 3, 448.0)
        if HAS_PTS:
            multiplier = tl.math.div_rn(tl.math.div_rn(1.0, per_tensor_scale), stored)
            scale = per_tensor_scale * stored
        else:
            multiplier = tl.math.div_rn(1.0, stored)
            scale = stored
    else:
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - EMAX
        e = tl.minimum(tl.maximum(e, -127), 127)
        multiplier = _exp2_int(-e)
        scale = _exp2_int(e)
    q = _round_to_grid(x * multiplier[:, None], EMIN, MBITS, MAX_VALUE) * scale[:, None]
    q = tl.where(finite[:, None], q, float("nan"))
    tl.store(out_ptr + offsets, q, mask=mask)


def fake_quantize_triton_rows(
    rows: torch.Tensor, out: torch.Tensor, fmt: Format, per_tensor_scale: torch.Tensor | None
) -> None:
    """The Triton kernel on contiguous fp32 ``rows`` (blocks along the last dim), into ``out``
    (called through :func:`harness.formats.fast.fake_quantize_fast`)."""
    row_len = rows.shape[-1]
    block = fmt.block_shape[0]
    n_blocks = (rows.numel() // row_len) * triton.cdiv(row_len, block)
    elem = fmt.element
    grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
    _fake_quantize_kernel[grid](
        rows,
        out,
        n_blocks,
        row_len,
        float(per_tensor_scale) if per_tensor_scale is not None else 1.0,
        BLOCK=block,
        BLOCKS=BLOCKS_PER_PROGRAM,
        EMIN=elem.emin,
        MBITS=elem.mbits,
        EMAX=elem.emax,
        MAX_VALUE=elem.max_value,
        E4M3_SCALE=not isinstance(fmt.scale, E8M0Scale),
        HAS_PTS=per_tensor_scale is not None,
    )
