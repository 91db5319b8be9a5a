"""The CPU fast path of :func:`harness.formats.fake_quantize`: one pass over memory per block in
C (``fast_kernel.c``, OpenMP over blocks), bit-identical to the reference tensor path.

The kernel is compiled once per machine with the system C compiler into the harness cache
(``$HARNESS_CACHE_DIR/kernels``, default ``~/.cache/harness/kernels``) and loaded with ctypes:
no torch headers, so building takes about a second. Without a compiler the reference path is
used and :func:`unavailable_reason` says why. CUDA tensors take the Triton kernel
(:mod:`harness.formats.triton_kernel`, same arithmetic). Both cover the deterministic formats
with 1-D blocks (all but ``mxfp4_sr`` and ``mxfp4_2d``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from harness.formats.registry import Format
from harness.formats.scales import E8M0Scale
from harness.models import cache_dir

SOURCE = Path(__file__).with_name("fast_kernel.c")
CFLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-fast-math", "-ffp-contract=off", "-std=c99")


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc/gcc) on PATH"
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"fast_kernel-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            return None, f"{compiler} failed to build {SOURCE.name}: {proc.stderr.strip()[:500]}"
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(target))
    lib.fake_quantize_rows.restype = None
    lib.fake_quantize_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    return lib, ""


def unavailable_reason() -> str:
    """Empty when the fast path is usable here, else why it is not."""
    return _build()[1]


@functools.cache
def _triton_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return ""


def format_reason(fmt: Format) -> str:
    """Empty when the fast kernels implement ``fmt`` (format and scale mode), else why not."""
    if fmt.stochastic:
        return f"{fmt.name} rounds stochastically with a torch.Generator (reference path only)"
    if len(fmt.block_shape) != 1:
        return f"{fmt.name} uses 2-D tiles (reference path only)"
    if fmt.scale.mode != "floor":
        return f"{fmt.name} with scale_mode={fmt.scale.mode!r} (reference path only)"
    if fmt.element.twos_complement:
        return f"{fmt.name} has two's-complement elements (reference path only)"
    return ""


def supports(fmt: Format, x: torch.Tensor) -> str:
    """Empty when ``fmt`` on ``x`` can take a fast path (C on CPU, Triton on CUDA), else why not."""
    if why := format_reason(fmt):
        return why
    if x.device.type == "cuda":
        return _triton_reason()
    if x.device.type != "cpu":
        return f"no fast path for {x.device.type} tensors"
    return unavailable_reason()


def fake_quantize_c_rows(
    rows: torch.Tensor, out: torch.Tensor, fmt: Format, per_tensor_scale: torch.Tensor | None
) -> None:
    """The C kernel on contiguous fp32 ``rows`` (blocks along the last dim), into ``out``."""
    lib, _ = _build()
    row_len = rows.shape[-1]
    elem = fmt.element
    lib.fake_quantize_rows(
        rows.data_ptr(), out.data_ptr(), rows.numel() // row_len, row_len, fmt.block_shape[0],
        elem.emin, elem.mbits, elem.emax, elem.max_value, 0 if isinstance(fmt.scale, E8M0Scale) else 1,
        float(per_tensor_scale) if per_tensor_scale is not None else 0.0, torch.get_num_threads(),
    )  # fmt: skip


def fake_quantize_fast(
    x: torch.Tensor, fmt: Format, axis: int, per_tensor_scale: torch.Tensor | None, kernel=None
) -> torch.Tensor:
    """``fake_quantize`` of a validated input on a fast kernel (caller checked :func:`supports`):
    the blocks' axis is moved last and made contiguous fp32, ``kernel(rows, out, fmt, scale)``
    fills ``out``, and the result goes back to ``x``'s layout and dtype. ``kernel`` defaults to
    the device's: the Triton kernel for CUDA tensors, the C kernel for CPU tensors."""
    if kernel is None and x.device.type == "cuda":
        from harness.formats.triton_kernel import fake_quantize_triton_rows as kernel
    rows = x.detach().to(torch.float32).movedim(axis, -1).contiguous()
    out = torch.empty_like(rows)
    (kernel or fake_quantize_c_rows)(rows, out, fmt, per_tensor_scale)
    return out.movedim(-1, axis).to(x.dtype).contiguous()
