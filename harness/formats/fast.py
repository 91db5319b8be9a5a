"""The fast paths of :func:`harness.formats.fake_quantize` (and of :func:`harness.formats.quantize`,
which writes element and scale codes instead of values): one pass over memory, reading and
writing the input's own dtype (fp32, bf16, fp16; fp32 only in registers), bit-identical to the
reference tensor path, for every format: 1-D blocks, ``mxfp4_2d``'s 32x32 tiles, and
``mxfp4_sr``'s stochastic rounding from the same Philox4x32-10 stream (:mod:`harness.formats.philox`).

CPU tensors take the C kernel (``fast_kernel.c``, POSIX threads over tiles), compiled once per
machine with the system C compiler into the harness cache (``$HARNESS_CACHE_DIR/kernels``,
default ``~/.cache/harness/kernels``), its sha256 recorded beside it and checked before every
load (:mod:`harness.cache`), and loaded with ctypes: no torch headers, so building takes about a
second. Without a compiler, or when neither the cache nor a temporary directory can hold the
build, the reference path is used and :func:`unavailable_reason` says why. CUDA tensors take the
Triton kernel (:mod:`harness.formats.triton_kernel`, same arithmetic). Both kernels are
parametric in the element grid (``emin``, ``mbits``, ``emax``, max), the tile shape, the scale
kind (E8M0 / E4M3 and its grid) and the E8M0 shared-exponent rule (``fmt.scale.mode``, passed as
its :class:`harness.formats.scales.ScaleCode`). The real-valued-scale formats (FP8, INT8, INT4)
take the same build's affine entry points on CPU (:mod:`harness.formats.fast_affine`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.cache import cached_dir, notice
from harness.formats import fast_affine, philox
from harness.formats.elements import E4M3
from harness.formats.registry import Format
from harness.formats.scales import E8M0Scale, ScaleCode, ScaleMode
from harness.paths import cache_dir

SOURCE = Path(__file__).with_name("fast_kernel.c")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_TILE = 1024  # elements per tile, fast_kernel.c's MAX_TILE
LIBRARY = "fast_kernel.so"
CFLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-fast-math", "-ffp-contract=off", "-std=c99")
NATIVE = ("-march=native",)  # this CPU's vector units (AVX2/AVX-512): the build is keyed on the CPU


def _cpu_key() -> bytes:
    """What a -march=native build depends on: the machine type and the CPU's feature flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}".encode()


@dataclass(frozen=True)
class TileJob:
    """What both kernels are told: a row-major ``(n_mats, n_rows, row_len)`` tensor cut into
    ``tile_rows x tile_cols`` tiles (``1 x block`` for 1-D formats), the element grid (and
    whether its codes are two's complement, which have no -0), the scale (``scale_mode``: the
    E8M0 rule's :class:`harness.formats.scales.ScaleCode`; E4M3 scales round onto
    the E4M3 grid) and, for stochastic rounding, the Philox key (None: round to nearest even)."""

    n_mats: int
    n_rows: int
    row_len: int
    tile_rows: int
    tile_cols: int
    emin: int
    mbits: int
    emax: int
    max_value: float
    ebits: int
    twos_complement: bool
    e4m3_scale: bool
    scale_mode: ScaleCode
    scale_nan_code: int
    per_tensor_scale: float | None
    seed: int | None

    @property
    def n_tiles(self) -> int:
        return self.n_mats * -(-self.n_rows // self.tile_rows) * -(-self.row_len // self.tile_cols)

    @property
    def code_bytes(self) -> int:
        """Bytes of one tile's element codes: one per element, FP4 two per byte (FP6: one per byte)."""
        elements = self.tile_rows * self.tile_cols
        return elements // 2 if 1 + self.ebits + self.mbits == 4 else elements


class _CParams(ctypes.Structure):
    _fields_ = [
        ("n_mats", ctypes.c_int64), ("n_rows", ctypes.c_int64), ("row_len", ctypes.c_int64),
        ("tile_rows", ctypes.c_int32), ("tile_cols", ctypes.c_int32), ("dtype", ctypes.c_int32),
        ("emin", ctypes.c_int32), ("mbits", ctypes.c_int32), ("emax", ctypes.c_int32),
        ("max_value", ctypes.c_float), ("scale_kind", ctypes.c_int32), ("scale_mode", ctypes.c_int32),
        ("per_tensor_scale", ctypes.c_float), ("stochastic", ctypes.c_int32), ("seed", ctypes.c_uint64),
        ("n_threads", ctypes.c_int32), ("twos_complement", ctypes.c_int32),
        ("scale_emin", ctypes.c_int32), ("scale_mbits", ctypes.c_int32), ("scale_max", ctypes.c_float),
        ("ebits", ctypes.c_int32), ("scale_nan_code", ctypes.c_int32),
    ]  # fmt: skip


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not).  The build is cached, atomic and verified
    by :func:`harness.cache.cached_dir`: a truncated or planted ``.so`` is rebuilt, never loaded."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc/gcc) on PATH"
    try:
        built = cached_dir(kernel_dir(), lambda d: _compile(compiler, d), "the C kernel")
        return load_kernel(built / LIBRARY), ""
    except (OSError, RuntimeError) as err:
        notice(f"warning: the C fast path is off, fake_quantize uses the reference path ({err})")
        return None, str(err)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load_kernel(path: Path) -> ctypes.CDLL:
    """The built kernel at ``path``, its entry points typed."""
    lib = ctypes.CDLL(str(path))
    lib.fake_quantize_tiles.restype = None
    lib.fake_quantize_tiles.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_CParams)]
    lib.quantize_tiles.restype = None
    lib.quantize_tiles.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_CParams)]
    fast_affine.declare(lib)
    return lib


def kernel_dir() -> Path:
    """The cache directory of this source, these flags and this CPU (-march=native):
    ``kernels/fast_kernel-<sha256[:16]>``."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_key()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"fast_kernel-{digest}"


def _compile(compiler: str, directory: Path) -> None:
    for flags in ((*CFLAGS, *NATIVE), CFLAGS):  # a compiler without -march=native: the portable build
        proc = compile_kernel(directory / LIBRARY, flags, compiler)
        if proc.returncode == 0:
            return
    raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {proc.stderr.strip()[:500]}")


def compile_kernel(path: Path, flags: tuple[str, ...], compiler: str | None = None) -> subprocess.CompletedProcess:
    """``compiler flags fast_kernel.c -o path -lm``; ``compiler`` defaults to $CC, else cc or gcc."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    return subprocess.run([compiler, *flags, str(SOURCE), "-o", str(path), "-lm"], capture_output=True, text=True)


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


def supports(fmt: Format, x: torch.Tensor) -> str:
    """Empty when ``fmt`` (under its own ``scale.mode``: the kernels have every rule) on ``x``
    can take a fast path (C on CPU, Triton on CUDA), else why not."""
    if not fmt.microscaling:
        return fast_affine.supports(fmt, x) or unavailable_reason()
    if fmt.block_size > MAX_TILE or (fmt.stochastic and fmt.block_size % 4):
        return f"{fmt.name}: blocks of {fmt.block_size} elements have no fast kernel"
    if x.device.type == "cuda":
        if any(d & (d - 1) for d in fmt.block_shape):
            return f"{fmt.name}: the Triton kernel needs power-of-two block dims, not {fmt.block_shape}"
        return _triton_reason()
    if x.device.type != "cpu":
        return f"no fast path for {x.device.type} tensors"
    return unavailable_reason()


def _c_params(x: torch.Tensor, job: TileJob) -> _CParams:
    return _CParams(
        job.n_mats, job.n_rows, job.row_len, job.tile_rows, job.tile_cols, DTYPE_CODES[x.dtype],
        job.emin, job.mbits, job.emax, job.max_value, int(job.e4m3_scale), job.scale_mode,
        job.per_tensor_scale or 0.0, job.seed is not None, job.seed or 0, torch.get_num_threads(),
        int(job.twos_complement), E4M3.emin, E4M3.mbits, E4M3.max_value, job.ebits, job.scale_nan_code,
    )  # fmt: skip


def fake_quantize_c(x: torch.Tensor, out: torch.Tensor, job: TileJob, *, lib: ctypes.CDLL | None = None) -> None:
    """The C kernel (``lib``, default this machine's cached build) on contiguous CPU ``x`` into
    ``out`` (same dtype)."""
    (lib or _build()[0]).fake_quantize_tiles(x.data_ptr(), out.data_ptr(), ctypes.byref(_c_params(x, job)))


def quantize_c(
    x: torch.Tensor, codes: torch.Tensor, scale_codes: torch.Tensor, job: TileJob, *, lib: ctypes.CDLL | None = None
) -> None:
    """The C kernel's real quantization of contiguous CPU ``x``: ``codes`` (uint8, ``(n_tiles,
    code_bytes)``) and ``scale_codes`` (uint8, ``(n_tiles,)``)."""
    params = ctypes.byref(_c_params(x, job))
    (lib or _build()[0]).quantize_tiles(x.data_ptr(), codes.data_ptr(), scale_codes.data_ptr(), params)


def _device_kernel(x: torch.Tensor, op: str):
    """The kernel of ``op`` (``fake_quantize`` or ``quantize``) for ``x``'s device: Triton on CUDA
    (imported only then), C on CPU."""
    if x.device.type == "cuda":
        from harness.formats import triton_kernel

        return getattr(triton_kernel, f"{op}_triton")
    return {"fake_quantize": fake_quantize_c, "quantize": quantize_c}[op]


def fake_quantize_fast(
    x: torch.Tensor,
    fmt: Format,
    axis: int,
    per_tensor_scale: torch.Tensor | None,
    generator: torch.Generator | None = None,
    *,
    kernel=None,
    calibrated_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fake_quantize`` of a validated input on a fast kernel (caller checked :func:`supports`).
    ``kernel(x, out, job)`` fills ``out`` in ``x``'s dtype; it defaults to the device's: Triton
    for CUDA tensors, C for CPU tensors. See :func:`_tile_job` for the layout and the scale rule.
    Real-valued-scale formats take :func:`harness.formats.fast_affine.fake_quantize_affine`
    (``calibrated_amax``: a static per-tensor range)."""
    if not fmt.microscaling:
        return fast_affine.fake_quantize_affine(x, fmt, axis, calibrated_amax)
    kernel = kernel or _device_kernel(x, "fake_quantize")
    src, job = _tile_job(x, fmt, axis, per_tensor_scale, generator)
    out = torch.empty_like(src)
    kernel(src, out, job)
    return out if len(fmt.block_shape) == 2 else out.movedim(-1, axis).contiguous()


def quantize_fast(
    x: torch.Tensor,
    fmt: Format,
    axis: int,
    per_tensor_scale: torch.Tensor | None,
    generator: torch.Generator | None = None,
    *,
    kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize``'s element codes and scale codes of a validated input on a fast kernel (caller
    checked :func:`supports`), tile after tile in the order of
    :attr:`harness.formats.blocks.BlockLayout.blocks_shape`: codes ``(n_tiles, code_bytes)``
    (padding's codes included), scale codes ``(n_tiles,)``, both uint8.
    ``kernel(x, codes, scale_codes, job)`` defaults to the device's (Triton on CUDA, C on CPU)."""
    kernel = kernel or _device_kernel(x, "quantize")
    src, job = _tile_job(x, fmt, axis, per_tensor_scale, generator)
    codes = torch.empty((job.n_tiles, job.code_bytes), dtype=torch.uint8, device=x.device)
    scale_codes = torch.empty(job.n_tiles, dtype=torch.uint8, device=x.device)
    kernel(src, codes, scale_codes, job)
    return codes, scale_codes


def _tile_job(
    x: torch.Tensor,
    fmt: Format,
    axis: int,
    per_tensor_scale: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, TileJob]:
    """``x`` as the kernels read it (contiguous; 1-D blocks: the blocks' axis moved last, a copy
    only when it is not last already; 2-D tiles: the last two dims) and the job describing it.
    The E8M0 rule is ``fmt.scale.mode`` (:meth:`harness.formats.registry.Format.with_scale_mode`);
    ``mxfp4_sr`` draws its Philox key from ``generator`` (:func:`harness.formats.philox.draw_seed`)."""
    two_d = len(fmt.block_shape) == 2
    src = x.detach() if two_d else x.detach().movedim(axis, -1)
    src = src.contiguous()
    row_len = src.shape[-1]
    n_rows = src.shape[-2] if two_d else src.numel() // row_len
    elem = fmt.element
    job = TileJob(
        n_mats=src.numel() // (n_rows * row_len),
        n_rows=n_rows,
        row_len=row_len,
        tile_rows=fmt.block_shape[0] if two_d else 1,
        tile_cols=fmt.block_shape[-1],
        emin=elem.emin,
        mbits=elem.mbits,
        emax=elem.emax,
        max_value=elem.max_value,
        ebits=elem.ebits,
        twos_complement=elem.twos_complement,
        e4m3_scale=not isinstance(fmt.scale, E8M0Scale),
        scale_mode=ScaleMode.parse(fmt.scale.mode).code,
        scale_nan_code=fmt.scale.nan_code,
        per_tensor_scale=float(per_tensor_scale) if per_tensor_scale is not None else None,
        seed=philox.draw_seed(generator, x.device) if fmt.stochastic else None,
    )
    return src, job
