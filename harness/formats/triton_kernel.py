"""The CUDA fast path of :func:`harness.formats.fake_quantize`: a Triton kernel with the C fast
path's arithmetic (``fast_kernel.c``: same formulas, same fp32 operation order, the same
Philox4x32-10 stream for stochastic rounding), so GPU and CPU results are bit-identical. It reads
and writes the input's dtype (fp32 only in registers): one read, one write. With ``CODES`` it
writes :func:`harness.formats.quantize`'s element codes and scale codes instead.

1-D formats: each program takes ``BYTES_1D`` of consecutive blocks of the row-major
``(rows, row_len)`` tensor, as a ``[blocks, block]`` array. 2-D tiles: each program takes
``BYTES_2D`` of neighbouring tiles of one strip of ``tile_rows`` rows, as a ``[rows, tiles,
cols]`` array, and reduces the amax over rows and cols.

Rounding to nearest even uses ``(t + 2**23) - 2**23``, exact for the ``0 <= t < 2**(mbits+1)``
that element rounding produces; divisions by powers of two are exact multiplications, the others
use ``div_rn`` (IEEE round-to-nearest, not the fast approximate division). Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors: its parity is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from harness.formats.elements import E4M3
from harness.formats.fast import TileJob
from harness.formats.scales import ScaleCode

BYTES_1D = 4096  # input bytes per program, 1-D formats: 1024 fp32 or 2048 bf16/fp16 elements
BYTES_2D = 8192  # input bytes per program, 2-D tiles: two 32x32 fp32 tiles or four bf16/fp16 ones
# (the best of the launch shapes swept on an H200 at 8192x8192; docs/measurements/2026-11-26-h200.md)
# The E8M0 rules' codes (``SCALE_MODE``), as the constexpr globals a jitted function may read.
FLOOR = tl.constexpr(int(ScaleCode.FLOOR))
CEIL = tl.constexpr(int(ScaleCode.CEIL))
EVEN = tl.constexpr(int(ScaleCode.EVEN))
RCEIL = tl.constexpr(int(ScaleCode.RCEIL))


@triton.jit
def _exp2_int(e):
    """Exactly 2**e in fp32 for integer e in [-149, 127] (subnormal powers included)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.maximum(e + 149, 0)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, subnormal)


@triton.jit
def _round_to_grid(
    v, noise, emin: tl.constexpr, mbits: tl.constexpr, max_value: tl.constexpr, STOCHASTIC: tl.constexpr
):
    """Round onto the element grid (ties to even, or up with probability ``frac`` when
    ``noise`` < ``frac``), saturate, keep the sign. The grid step is 2**k, k = max(floor_log2|v|,
    emin) - mbits; both 2**k and 2**-k are normal floats for every element grid (k is within
    [emin - mbits, 127 - mbits]), built from the biased exponent ``k + 127`` with two shifts,
    so ``|v| * 2**-k`` is exact (no division)."""
    bits = v.to(tl.int32, bitcast=True)
    a_bits = bits & 0x7FFFFFFF
    biased_k = tl.maximum(a_bits >> 23, emin + 127) - mbits
    t = a_bits.to(tl.float32, bitcast=True) * ((254 - biased_k) << 23).to(tl.float32, bitcast=True)
    if STOCHASTIC:
        n = t.to(tl.int32).to(tl.float32)  # floor: t >= 0
        n = n + tl.where(noise < t - n, 1.0, 0.0)
    else:
        n = (t + 8388608.0) - 8388608.0  # round half to even (fp32 RNE add)
    q = tl.minimum(n * (biased_k << 23).to(tl.float32, bitcast=True), max_value)
    return (q.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _scales(
    amax,
    per_tensor_scale,
    MBITS: tl.constexpr,
    EMAX: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    E4M3_SCALE: tl.constexpr,
    HAS_PTS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_EMIN: tl.constexpr,
    SCALE_MBITS: tl.constexpr,
    SCALE_MAX: tl.constexpr,
):
    """(multiplier, dequantization scale, scale code) of blocks with max ``amax`` (see
    fast_kernel.c); an E4M3 scale rounds onto the grid ``SCALE_EMIN``, ``SCALE_MBITS``, ``SCALE_MAX``."""
    if E4M3_SCALE:
        raw = tl.math.div_rn(amax, MAX_VALUE)  # IEEE division, as on CPU
        if HAS_PTS:
            raw = tl.math.div_rn(raw, per_tensor_scale)
        raw = tl.minimum(tl.maximum(raw, 2.0**SCALE_EMIN), SCALE_MAX)  # constexpr: exact
        stored = _round_to_grid(raw, 0.0, SCALE_EMIN, SCALE_MBITS, SCALE_MAX, False)
        if HAS_PTS:
            multiplier = tl.math.div_rn(tl.math.div_rn(1.0, per_tensor_scale), stored)
            scale = per_tensor_scale * stored
        else:
            multiplier = tl.math.div_rn(1.0, stored)
            scale = stored
        code = _magnitude_code(stored.to(tl.int32, bitcast=True), SCALE_EMIN, SCALE_MBITS)
    else:
        ab = amax.to(tl.int32, bitcast=True)
        if SCALE_MODE == CEIL:
            e = ((ab >> 23) & 0xFF) - 127 + tl.where((ab & 0x7FFFFF) != 0, 1, 0) - EMAX
        elif SCALE_MODE == EVEN:
            e = (((ab + (1 << (22 - MBITS))) >> 23) & 0xFF) - 127 - EMAX
        elif SCALE_MODE == RCEIL:
            db = tl.math.div_rn(amax, MAX_VALUE).to(tl.int32, bitcast=True)
            inexact = tl.where((db & 0x7FFFFF) != 0, 1, 0)
            e = tl.where((db & 0x7F800000) == 0, -127, ((db >> 23) & 0xFF) - 127 + inexact)
        else:  # FLOOR
            e = ((ab >> 23) & 0xFF) - 127 - EMAX
        e = tl.minimum(tl.maximum(e, -127), 127)
        multiplier = _exp2_int(-e)
        scale = _exp2_int(e)
        code = e + 127
    return multiplier, scale, code


@triton.jit
def _magnitude_code(a_bits, emin: tl.constexpr, mbits: tl.constexpr):
    """Code of a non-negative grid value given as its fp32 bits: ``(max(floor_log2, emin) - emin)
    << mbits`` plus the significand in grid steps (exact), as fast_kernel.c's magnitude_code."""
    biased_e = tl.maximum(a_bits >> 23, emin + 127)
    t = a_bits.to(tl.float32, bitcast=True) * ((254 - (biased_e - mbits)) << 23).to(tl.float32, bitcast=True)
    return ((biased_e - (emin + 127)) << mbits) + t.to(tl.int32)


@triton.jit
def _element_code(q, emin: tl.constexpr, mbits: tl.constexpr, ebits: tl.constexpr, TWOS_COMPLEMENT: tl.constexpr):
    """Code of signed grid value ``q`` (int32 in [0, 255]): sign bit above the magnitude, or the
    negated magnitude in two's complement."""
    bits = q.to(tl.int32, bitcast=True)
    mag = _magnitude_code(bits & 0x7FFFFFFF, emin, mbits)
    if TWOS_COMPLEMENT:
        return tl.where(bits < 0, -mag, mag) & 0xFF
    return mag | (((bits >> 31) & 1) << (ebits + mbits))


@triton.jit
def _uniform(seed, counter):
    """Philox4x32-10 uniforms in [0, 1) of the elements ``4 * counter + (0, 1, 2, 3)``, shape
    ``(*counter.shape, 2, 2)`` with ``[..., k, j]`` = word ``2k + j``: reshaped row-major, word
    ``w`` of counter ``c`` lands on element ``4c + w``."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return (words >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _fake_quantize_kernel(
    x_ptr,
    out_ptr,
    scale_codes_ptr,
    n_tiles,
    n_rows,
    row_len,
    per_tensor_scale,
    seed,
    TR: tl.constexpr,
    TC: tl.constexpr,
    TILES: tl.constexpr,
    EMIN: tl.constexpr,
    MBITS: tl.constexpr,
    EMAX: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    E4M3_SCALE: tl.constexpr,
    HAS_PTS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_EMIN: tl.constexpr,
    SCALE_MBITS: tl.constexpr,
    SCALE_MAX: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    TWOS_COMPLEMENT: tl.constexpr,
    BF16_BITS: tl.constexpr,
    CODES: tl.constexpr,
    EBITS: tl.constexpr,
    SCALE_NAN_CODE: tl.constexpr,
    OUT_MAX: tl.constexpr,
):
    """Fake quantization into ``out_ptr``, or (``CODES``) the element codes into ``out_ptr``
    (uint8, tile after tile, FP4 two per byte, element 2i in the low nibble) and the scale
    codes into ``scale_codes_ptr`` (one per tile)."""
    tiles_c = (row_len + TC - 1) // TC
    t = tl.program_id(0) * TILES + tl.arange(0, TILES)  # global tile (block) indices, int32
    if TR == 1:  # [tiles, cols]: consecutive blocks of rows
        col = (t % tiles_c)[:, None] * TC + tl.arange(0, TC)[None, :]
        offsets = (t // tiles_c).to(tl.int64)[:, None] * row_len + col
        mask = (t < n_tiles)[:, None] & (col < row_len)
        # Philox counters (element n -> counter n // 4), 64-bit
        counter = t.to(tl.int64)[:, None] * (TC // 4) + tl.arange(0, TC // 4)[None, :]
    else:  # [rows, tiles, cols]: TILES neighbouring tiles of one strip
        tiles_r = (n_rows + TR - 1) // TR
        r = tl.arange(0, TR)[:, None, None]
        c = tl.arange(0, TC)[None, None, :]
        strip = t // tiles_c  # mat * tiles_r + tile row
        row = (strip % tiles_r)[None, :, None] * TR + r
        col = (t % tiles_c)[None, :, None] * TC + c
        offsets = ((strip // tiles_r).to(tl.int64)[None, :, None] * n_rows + row) * row_len + col
        mask = (t < n_tiles)[None, :, None] & (row < n_rows) & (col < row_len)
        counter = t.to(tl.int64)[None, :, None] * (TR * TC // 4) + r * (TC // 4) + tl.arange(0, TC // 4)[None, None, :]
    if BF16_BITS:  # bf16 as int16 bits: widening is a shift (exact, subnormals included)
        x = (tl.load(x_ptr + offsets, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # amax and finiteness from one integer max of |x|'s bits (non-negative floats order as their
    # bits; NaN and Inf are the patterns >= 0x7F800000)
    a_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if TR == 1:
        amax_bits = tl.max(a_bits, axis=1)
    else:
        amax_bits = tl.max(tl.max(a_bits, axis=2), axis=0)
    finite = amax_bits < 0x7F800000
    amax = amax_bits.to(tl.float32, bitcast=True)
    multiplier, scale, scale_code = _scales(
        amax,
        per_tensor_scale,
        MBITS,
        EMAX,
        MAX_VALUE,
        E4M3_SCALE,
        HAS_PTS,
        SCALE_MODE,
        SCALE_EMIN,
        SCALE_MBITS,
        SCALE_MAX,
    )
    if CODES:
        tl.store(scale_codes_ptr + t, tl.where(finite, scale_code, SCALE_NAN_CODE).to(tl.uint8), mask=t < n_tiles)
    if TR == 1:
        multiplier, scale, finite = multiplier[:, None], scale[:, None], finite[:, None]
    else:
        multiplier, scale, finite = multiplier[None, :, None], scale[None, :, None], finite[None, :, None]
    noise = 0.0
    if STOCHASTIC:
        noise = tl.reshape(_uniform(seed, counter), x.shape)
    q = _round_to_grid(x * multiplier, noise, EMIN, MBITS, MAX_VALUE, STOCHASTIC)
    if not E4M3_SCALE and SCALE_MODE != FLOOR:  # saturate codes whose value would overflow (fast_kernel.c grid_limit)
        limit = _round_to_grid(tl.minimum(OUT_MAX * multiplier, MAX_VALUE), 1.0, EMIN, MBITS, MAX_VALUE, True)
        q = tl.where(q > limit, limit, tl.where(q < -limit, -limit, q))
    if CODES:
        _store_codes(
            out_ptr,
            tl.where(finite, _element_code(q, EMIN, MBITS, EBITS, TWOS_COMPLEMENT), 0),
            t,
            n_tiles,
            TR,
            TC,
            TILES,
            1 + EBITS + MBITS == 4,  # FP4: two codes per byte
        )
    else:
        q = q * scale
        if TWOS_COMPLEMENT:  # integer codes have no -0: -0.0 + 0.0 == +0.0 (IEEE, not folded without nsz)
            q = q + 0.0
        if BF16_BITS:  # to nearest even, as torch's .to(torch.bfloat16); 0x7FC0 is its NaN
            u = q.to(tl.int32, bitcast=True)
            h = tl.where(finite, (u + 0x7FFF + ((u >> 16) & 1)) >> 16, 0x7FC0)
            tl.store(out_ptr + offsets, h.to(tl.int16), mask=mask)
        else:
            q = tl.where(finite, q, float("nan"))
            tl.store(out_ptr + offsets, q.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_codes(
    codes_ptr, code, t, n_tiles, TR: tl.constexpr, TC: tl.constexpr, TILES: tl.constexpr, PACK: tl.constexpr
):
    """Tile ``t``'s codes (``[TILES, TC]`` or ``[TR, TILES, TC]``) at ``t * TR * TC`` in the
    tile's row-major order, or two per byte (``PACK``: element 2i low, 2i + 1 high nibble)."""
    if PACK:
        if TR == 1:
            lo, hi = tl.split(tl.reshape(code, [TILES, TC // 2, 2]))
        else:
            lo, hi = tl.split(tl.reshape(code, [TR, TILES, TC // 2, 2]))
        code = lo | (hi << 4)
    width: tl.constexpr = TC // 2 if PACK else TC
    if TR == 1:
        offsets = t.to(tl.int64)[:, None] * width + tl.arange(0, width)[None, :]
        mask = (t < n_tiles)[:, None]
    else:
        r = tl.arange(0, TR)[:, None, None]
        offsets = t.to(tl.int64)[None, :, None] * (TR * width) + r * width + tl.arange(0, width)[None, None, :]
        mask = (t < n_tiles)[None, :, None]
    tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=mask)


def fake_quantize_triton(x: torch.Tensor, out: torch.Tensor, job: TileJob) -> None:
    """The Triton kernel on contiguous ``x`` into ``out`` (same dtype; called through
    :func:`harness.formats.fast.fake_quantize_fast`)."""
    _launch(x, out, out, job, codes=False)


def quantize_triton(x: torch.Tensor, codes: torch.Tensor, scale_codes: torch.Tensor, job: TileJob) -> None:
    """The Triton kernel's real quantization of contiguous ``x`` into ``codes`` and
    ``scale_codes`` (uint8; called through :func:`harness.formats.fast.quantize_fast`)."""
    _launch(x, codes, scale_codes, job, codes=True)


def _launch(x: torch.Tensor, out: torch.Tensor, scale_codes: torch.Tensor, job: TileJob, *, codes: bool) -> None:
    n_tiles = job.n_tiles
    per_tile = job.tile_rows * job.tile_cols * x.element_size()
    tiles = 1 << max(0, ((BYTES_1D if job.tile_rows == 1 else BYTES_2D) // per_tile).bit_length() - 1)  # a power of 2
    bf16 = x.dtype == torch.bfloat16  # passed as int16 bits: Triton's interpreter rounds bf16 subnormals wrongly
    _fake_quantize_kernel[(triton.cdiv(n_tiles, tiles),)](
        x.view(torch.int16) if bf16 else x,
        out.view(torch.int16) if bf16 and not codes else out,
        scale_codes,
        n_tiles,
        job.n_rows,
        job.row_len,
        job.per_tensor_scale if job.per_tensor_scale is not None else 1.0,
        job.seed if job.seed is not None else 0,
        TR=job.tile_rows,
        TC=job.tile_cols,
        TILES=tiles,
        EMIN=job.emin,
        MBITS=job.mbits,
        EMAX=job.emax,
        MAX_VALUE=job.max_value,
        E4M3_SCALE=job.e4m3_scale,
        HAS_PTS=job.per_tensor_scale is not None,
        SCALE_MODE=int(job.scale_mode),
        SCALE_EMIN=E4M3.emin,
        SCALE_MBITS=E4M3.mbits,
        SCALE_MAX=E4M3.max_value,
        STOCHASTIC=job.seed is not None,
        TWOS_COMPLEMENT=job.twos_complement,
        BF16_BITS=bf16,
        CODES=codes,
        EBITS=job.ebits,
        SCALE_NAN_CODE=job.scale_nan_code,
        OUT_MAX=float(torch.finfo(x.dtype).max),
    )
