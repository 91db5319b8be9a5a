"""The C fast path of the real-valued-scale formats (:mod:`harness.formats.affine`: FP8 E4M3 and
INT8 / INT4, per tensor, row, 1x128 group or 128x128 tile, UE8M0 or real scales, symmetric or
with a zero point), bit-identical to the reference path, on CPU tensors (fp32, bf16, fp16).

Two passes over ``x`` in the C kernel's build (``fast_kernel.c``, :mod:`harness.formats.fast`):
``affine_stats`` writes each group's min and max (exact), from which the scales are computed
by :func:`harness.formats.affine.qparams` itself, on a ``(groups, 2)`` tensor holding those two
values in the input dtype (its ``amax`` of ``|.|``, ``amin`` and ``amax`` are the group's), so
the scales are the reference's by construction; then ``affine_tiles`` quantizes and dequantizes
every element with its group's operand, zero point and scale in the dtypes the reference
computes in (``fast_kernel.c`` says how), writing NaN for groups holding NaN or Inf.
"""

from __future__ import annotations

import ctypes

import torch

from harness.formats import affine
from harness.formats.registry import Format
from harness.threads import one_thread

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class AffineParams(ctypes.Structure):
    _fields_ = [
        ("n_mats", ctypes.c_int64), ("n_rows", ctypes.c_int64), ("row_len", ctypes.c_int64),
        ("tile_rows", ctypes.c_int64), ("tile_cols", ctypes.c_int64),
        ("dtype", ctypes.c_int32), ("n_threads", ctypes.c_int32),
        ("divide", ctypes.c_int32), ("narrow", ctypes.c_int32), ("nan_to_zero", ctypes.c_int32),
        ("integer", ctypes.c_int32),
        ("qmin", ctypes.c_float), ("qmax", ctypes.c_float), ("emin", ctypes.c_int32), ("mbits", ctypes.c_int32),
        ("out_max", ctypes.c_float),
    ]  # fmt: skip


def declare(lib: ctypes.CDLL) -> None:
    """Type the affine entry points of a loaded kernel build."""
    lib.affine_stats.restype = None
    lib.affine_stats.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(AffineParams)]
    lib.affine_tiles.restype = None
    lib.affine_tiles.argtypes = [ctypes.c_void_p] * 6 + [ctypes.POINTER(AffineParams)]


def supports(fmt: Format, x: torch.Tensor) -> str:
    """Empty when the affine C kernel takes ``fmt`` on ``x``, else why not."""
    if x.device.type != "cpu":
        return f"{fmt.name}: real-valued ({fmt.grouping}) scales have a fast kernel on CPU only"
    if x.dtype not in DTYPE_CODES:
        return f"{fmt.name}: no fast kernel for {x.dtype}"
    if _narrow(fmt, x.dtype) is None:
        return f"{fmt.name}: the C kernel computes in fp32 or in the input dtype, not in mixed ones"
    return ""


def _narrow(fmt: Format, dtype: torch.dtype) -> bool | None:
    """True where ``x / scale`` (or ``x * operand``) and the dequantization are in ``dtype``,
    False where both are fp32 (torch's type promotion of ``dtype`` and the scale's storage
    dtype), None otherwise (no kernel)."""
    store = dtype if fmt.scale.storage_dtype == "input" else torch.float32
    operand = torch.float32 if fmt.scale.apply == "inverse_amax" else store
    if torch.promote_types(dtype, operand) == dtype == store:
        return True
    return None if torch.float32 not in (operand, store) or store != torch.float32 else False


def _layout(x: torch.Tensor, fmt: Format, axis: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, int]]:
    """``x`` as the kernel reads it (contiguous, groups along the last dim; tiles: the last two
    dims; the tensor: its rows), ``(n_mats, n_rows, row_len)`` and the quantization tile."""
    if fmt.grouping == "tile":
        src = x.detach().contiguous()
        n_rows, row_len = src.shape[-2:]
        return src, (src.numel() // (n_rows * row_len), n_rows, row_len), fmt.block_shape
    src = x.detach()
    if x.dim() == 1:
        src = src.reshape(1, -1)
    elif fmt.grouping != "tensor":
        src = src.movedim(axis, -1)
    src = src.contiguous()
    row_len = src.shape[-1]
    n_rows = src.numel() // row_len
    if fmt.grouping == "tensor":
        return src, (1, n_rows, row_len), (n_rows, row_len)
    return src, (1, n_rows, row_len), (1, row_len if fmt.grouping == "row" else fmt.block_shape[0])


def _params(x: torch.Tensor, fmt: Format, dims: tuple[int, ...], tile: tuple[int, int], **codes) -> AffineParams:
    elem = fmt.element
    integer = isinstance(elem, affine.IntElement)
    qmin, qmax = (elem.qmin, elem.qmax) if integer else (-elem.max_value, elem.max_value)
    return AffineParams(
        *dims, *tile, DTYPE_CODES[x.dtype], torch.get_num_threads(), codes.get("divide", 0),
        codes.get("narrow", 0), codes.get("nan_to_zero", 0), int(integer),
        qmin, qmax, 0 if integer else elem.emin, 0 if integer else elem.mbits,
        torch.finfo(x.dtype).max,
    )  # fmt: skip


def _group_scales(
    stats: torch.Tensor, dtype: torch.dtype, fmt: Format, amax: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """Per group: finite (bool), the fp32 ``[operand, zero point, scale]`` arrays and whether
    the operand divides ``x``, from the groups' ``(min, max)`` (fp32, exact), by the reference's
    :func:`harness.formats.affine.qparams` and :func:`harness.formats.affine.operand`."""
    if fmt.grouping == "tensor":
        stats = torch.stack((stats[:, 0].amin(), stats[:, 1].amax())).reshape(1, 2)
    s, zp, top = affine.qparams(stats.to(dtype), fmt.element, fmt.scale, amax)
    operand, divide = affine.operand(s, top, fmt.scale)
    if zp is not None:
        zero = zp.float()
    else:  # -0 is the identity of v + z; +0 turns a -0 quotient into +0, as the library's added zero point
        zero = torch.full_like(s, 0.0 if fmt.scale.adds_zero else -0.0, dtype=torch.float32)
    finite = torch.isfinite(stats).all(-1)
    return finite, [t.float().contiguous() for t in (operand, zero, s)], divide


def fake_quantize_affine(
    x: torch.Tensor, fmt: Format, axis: int, amax: torch.Tensor | None = None, *, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """``fake_quantize`` of a validated non-empty CPU input in real-valued-scale format ``fmt``
    (``amax``: a calibrated per-tensor range) on the C kernel ``lib`` (default this machine's
    cached build; the caller checked :func:`supports` and :func:`harness.formats.fast.unavailable_reason`)."""
    if lib is None:
        from harness.formats.fast import _build

        lib = _build()[0]
    src, dims, tile = _layout(x, fmt, axis)
    stats_tile = (1, dims[2]) if fmt.grouping == "tensor" else tile
    n_groups = dims[0] * -(-dims[1] // stats_tile[0]) * -(-dims[2] // stats_tile[1])
    stats = torch.empty((n_groups, 2), dtype=torch.float32)
    lib.affine_stats(src.data_ptr(), stats.data_ptr(), ctypes.byref(_params(src, fmt, dims, stats_tile)))
    with one_thread():  # the per-group tensors are small (numel / 128 at most): on 2 loaded cores
        # a parallel region there cost 72-320 ms, one thread 1-11 ms (131072 groups)
        finite, group_arrays, divide = _group_scales(stats, src.dtype, fmt, amax)
    codes = {
        "divide": int(divide),
        "narrow": int(_narrow(fmt, src.dtype)),
        "nan_to_zero": int(fmt.scale.apply == "inverse_amax"),
    }
    out = torch.empty_like(src)
    lib.affine_tiles(
        src.data_ptr(), out.data_ptr(), *(t.data_ptr() for t in group_arrays), finite.data_ptr(),
        ctypes.byref(_params(src, fmt, dims, tile, **codes)),
    )  # fmt: skip
    if fmt.grouping in ("tile", "tensor"):
        return out.reshape(x.shape)
    return (out.reshape(x.shape) if x.dim() == 1 else out.movedim(-1, axis)).contiguous()
