"""The fast kernels themselves, each called directly: the C kernel on CPU (as built here with
-march=native, and built portably, which takes its generic paths such as the Philox loop without
AVX-512) and the Triton kernel (compiled on CUDA where there is a GPU, in Triton's CPU interpreter
otherwise, see conftest.py).

- Bit parity with the reference path for every format, ``mxfp4_2d`` tiles and ``mxfp4_sr``
  (same generator state, same Philox stream) included, in fp32, bf16 and fp16, on the parity
  suite's edge cases, partial blocks and a 3-D tensor.
- The Philox4x32-10 stream against Random123's published known-answer vectors.
- Stochastic rounding statistics on each kernel: only the two neighbouring grid points, an
  unbiased mean, seeds reproduce, successive calls with one generator differ.
- The E8M0 scale modes (torchao's ``ScaleCalculationMode``) against torchao itself.
- Real quantization (``quantize``'s element and scale codes) from each kernel, byte for byte
  the reference path's, for every format and dtype.
- The real-valued-scale formats (FP8 / INT8 / INT4 per tensor, row, group, tile;
  :mod:`harness.formats.fast_affine`) on the C kernel, both builds, bit for bit the reference
  path's in fp32, bf16 and fp16, along both axes, on the parity cases plus all-zero and
  signed-zero groups and subnormal groups, and a calibrated per-tensor range.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from harness.formats import SCALE_MODES, fake_quantize, get_format, nvfp4_per_tensor_scale, quantize
from harness.formats.fast import (
    CFLAGS,
    LIBRARY,
    compile_kernel,
    fake_quantize_c,
    fake_quantize_fast,
    load_kernel,
    quantize_c,
    quantize_fast,
    supports,
    unavailable_reason,
)
from harness.formats.fast_affine import fake_quantize_affine
from harness.formats.philox import philox4x32
from harness.testing import assert_same_bits, format_params
from suites.formats import data

# CUDA under --gpu; otherwise the CPU and Triton's interpreter (TRITON_INTERPRET, set by conftest.py)
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DRAWS = 400


def _triton():
    pytest.importorskip("triton", reason="triton is not installed: the CUDA fast path is not available here")
    from harness.formats.triton_kernel import fake_quantize_triton

    return fake_quantize_triton


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """The C kernel built without -march=native, as on a CPU or compiler without it: its generic
    code paths (the portable Philox loop, no AVX-512) must give the same bits as the native build."""
    path = tmp_path_factory.mktemp("portable-kernel") / LIBRARY
    proc = compile_kernel(path, CFLAGS)
    assert proc.returncode == 0, proc.stderr
    return load_kernel(path)


@pytest.fixture(params=["c", "c-portable", "triton"])
def backend(request):
    """(kernel, device) of the kernel under test (overrides the suite's two-path fixture: this
    module calls each kernel directly): the C kernel as built here (-march=native) and built
    portably, and the Triton kernel."""
    if request.param.startswith("c"):
        if unavailable_reason():
            pytest.skip(f"C fast path unavailable here: {unavailable_reason()}")
        lib = request.getfixturevalue("portable_lib") if request.param == "c-portable" else None
        return functools.partial(fake_quantize_c, lib=lib), torch.device("cpu")
    return _triton(), DEVICE


def _codes_kernel(kernel):
    """The real-quantization entry of the same kernel (C, the same build; or Triton)."""
    if isinstance(kernel, functools.partial) and kernel.func is fake_quantize_c:
        return functools.partial(quantize_c, **kernel.keywords)
    from harness.formats.triton_kernel import quantize_triton

    return quantize_triton


def _run(backend, x: torch.Tensor, name: str, seed: int = 0, scale_mode: str = "floor") -> torch.Tensor:
    kernel, device = backend
    g = torch.Generator().manual_seed(seed)
    fmt = get_format(name).with_scale_mode(scale_mode)
    return fake_quantize_fast(x.to(device), fmt, -1, None, g, kernel=kernel).cpu()


def test_philox_known_answers() -> None:
    """Random123's kat_vectors for philox4x32_10 (counter words, key words -> output words)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, (k0, k1), expected in kat:
        assert philox4x32(torch.tensor([counter]), k0 | k1 << 32)[0].tolist() == list(expected)


PARITY_CASES = {k: data.CASES[k] for k in ("ties", "edge_magnitudes", "partial_blocks", "nan_inf_blocks")}
PARITY_CASES["3d"] = lambda fmt: data.normal((3, 37, 45), seed=6)


def _parity_params() -> list:
    """(kernel, format, dtype): the C kernel on everything; the Triton kernel on what
    test_triton_parity.py (1-D deterministic formats, fp32 and bf16, both axes) leaves out."""
    out = []
    for p in format_params(where=lambda f: f.microscaling):
        fmt = get_format(p.values[0])
        for dtype in DTYPES:
            covered = not fmt.stochastic and len(fmt.block_shape) == 1 and dtype != torch.float16
            for kernel in ("c", "c-portable") if covered else ("c", "c-portable", "triton"):
                out.append(
                    pytest.param(kernel, p.values[0], dtype, marks=p.marks, id=f"{kernel}-{p.id}-{str(dtype)[6:]}")
                )
    return out


@pytest.mark.parametrize(("backend", "name", "dtype"), _parity_params(), indirect=["backend"])
def test_kernel_matches_reference(backend, name: str, dtype: torch.dtype) -> None:
    """Same bits as ``backend="reference"`` (for ``mxfp4_sr``: from the same generator seed)."""
    fmt = get_format(name)
    for case, make in PARITY_CASES.items():
        x = make(fmt).to(dtype)
        want = fake_quantize(x, name, generator=torch.Generator().manual_seed(0), backend="reference")
        assert_same_bits(_run(backend, x, name), want, f"{name}/{case}")


def _quantize_params() -> list:
    """(kernel, format, dtype): both kernels on every format and dtype."""
    return [
        pytest.param(kernel, p.values[0], dtype, marks=p.marks, id=f"{kernel}-{p.id}-{str(dtype)[6:]}")
        for p in format_params(where=lambda f: f.microscaling)
        for dtype in DTYPES
        for kernel in ("c", "c-portable", "triton")
    ]


@pytest.mark.parametrize(("backend", "name", "dtype"), _quantize_params(), indirect=["backend"])
def test_quantize_kernel_matches_reference(backend, name: str, dtype: torch.dtype) -> None:
    """The kernel's element codes (FP4 packed) and scale codes are the reference ``quantize``'s,
    byte for byte (``mxfp4_sr``: same generator seed), on the parity cases; the edge magnitudes
    (scale codes at both clamps) in fp32 under every E8M0 scale mode, and NVFP4 with its
    per-tensor scale too."""
    kernel, device = backend
    fmt = get_format(name)
    for case, make in PARITY_CASES.items():
        x = make(fmt).to(dtype)
        every_mode = fmt.scale.name == "e8m0" and dtype == torch.float32 and case == "edge_magnitudes"
        modes = SCALE_MODES if every_mode else ("floor",)
        pts_choices = (None, nvfp4_per_tensor_scale(x)) if fmt.scale.supports_per_tensor_scale else (None,)
        for mode in modes:
            for pts in pts_choices:
                g = torch.Generator().manual_seed(0)
                want = quantize(x, name, generator=g, per_tensor_scale=pts, scale_mode=mode, backend="reference")
                codes, scales = quantize_fast(
                    x.to(device),
                    fmt.with_scale_mode(mode),
                    want.layout.axis,
                    None if pts is None else pts.to(device),
                    torch.Generator().manual_seed(0),
                    kernel=_codes_kernel(kernel),
                )
                where = f"{name}/{case}/{mode}/pts={pts is not None}"
                assert torch.equal(codes.cpu().reshape(want.codes.shape), want.codes), where
                assert torch.equal(scales.cpu().reshape(want.scales.shape), want.scales), where


@pytest.mark.mxfp4
@pytest.mark.parametrize("mode", SCALE_MODES)
def test_scale_modes_match_torchao(backend, mode: str) -> None:
    """Each E8M0 shared-exponent rule equals torchao 0.18's ``to_mx(..., scaling_mode=M)``."""
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    elements = {"mxfp4": torch.float4_e2m1fn_x2, "mxfp8_e4m3": torch.float8_e4m3fn}
    for name, element in elements.items():
        for x in (data.normal((16, 256), seed=60), data.student_t((16, 256), seed=61)):
            for dtype in (torch.float32, torch.bfloat16):
                x = x.to(dtype)
                t = mx.MXTensor.to_mx(x, element, 32, scaling_mode=getattr(ScaleCalculationMode, mode.upper()))
                assert_same_bits(_run(backend, x, name, scale_mode=mode), t.dequantize(dtype), f"{name}/{mode}")


@pytest.mark.mxfp4_sr
def test_stochastic_rounding_statistics(backend) -> None:
    """DRAWS copies of one (4, 64) tensor in one call draw independent noise (distinct Philox
    counters): each value is one of the two neighbouring grid points (scaled), with the sign of
    x, and the mean over copies is within 5 standard errors of x (standard error of a two-point
    draw: step * sqrt(p(1-p)/DRAWS)); saturated values are deterministic and left out."""
    x = data.normal((4, 64), seed=51)
    lo, hi, scale = data.sr_neighbours(x)
    out = _run(backend, x.repeat(DRAWS, 1), "mxfp4_sr", seed=52).reshape(DRAWS, -1, 32)
    mag = (out / scale).abs()
    assert ((mag == lo) | (mag == hi)).all()
    assert (torch.sign(out) * torch.sign(x.reshape(-1, 32)) >= 0).all()
    inside = x.reshape(-1, 32).abs() / scale <= 6.0
    step = (hi - lo) * scale
    p = torch.where(step > 0, (x.reshape(-1, 32).abs() - lo * scale) / step.clamp(min=1e-30), 0.0)
    se = step * (p * (1 - p) / DRAWS).sqrt()
    err = (out.mean(0) - x.reshape(-1, 32)).abs()
    assert (err[inside] <= 5 * se[inside] + 1e-7).all()
    assert (step[inside] > 0).any() and (err[inside] > 0).any()  # really random, really tested


@pytest.mark.mxfp4_sr
def test_stochastic_rounding_seeds(backend) -> None:
    """Same seed, same bits; another seed or the next call on one generator, other bits."""
    kernel, device = backend
    x = data.normal((16, 64), seed=53)
    assert torch.equal(_run(backend, x, "mxfp4_sr", seed=1), _run(backend, x, "mxfp4_sr", seed=1))
    assert not torch.equal(_run(backend, x, "mxfp4_sr", seed=1), _run(backend, x, "mxfp4_sr", seed=2))
    g = torch.Generator().manual_seed(3)
    first, second = (fake_quantize_fast(x.to(device), get_format("mxfp4_sr"), -1, None, g, kernel=kernel) for _ in "ab")
    assert not torch.equal(first, second)


def _zero_groups(fmt) -> torch.Tensor:
    """All-zero groups and tiles (some of -0.0, some mixed +-0), a zero row, and a row of one
    nonzero value among zeros, on a shape with full and partial 128-groups and 128x128 tiles."""
    x = data.normal((130, 300), seed=7)
    x[:, 128:256] = 0.0
    x[:, 128:256:3] = -0.0
    x[5] = -0.0
    x[6] = 0.0
    x[6, 299] = 1.5
    return x


def _subnormal_groups(fmt) -> torch.Tensor:
    """Groups entirely of fp32 subnormals (or of values whose scale underflows), with ties of the
    subnormal grid, beside normal groups."""
    x = data.normal((16, 256), seed=8)
    x[:8] *= 1e-39
    x[8:12] = torch.randint(-3, 4, (4, 256), generator=torch.Generator().manual_seed(9)).float() * 2.0**-149
    return x


AFFINE_CASES = {**PARITY_CASES, "zero_groups": _zero_groups, "subnormal_groups": _subnormal_groups}


def _affine_params() -> list:
    """(C build, format, dtype) for every real-valued-scale format."""
    return [
        pytest.param(kernel, p.values[0], dtype, marks=p.marks, id=f"{kernel}-{p.id}-{str(dtype)[6:]}")
        for p in format_params(where=lambda f: not f.microscaling)
        for dtype in DTYPES
        for kernel in ("c", "c-portable")
    ]


@pytest.mark.parametrize(("backend", "name", "dtype"), _affine_params(), indirect=["backend"])
def test_affine_kernel_matches_reference(backend, name: str, dtype: torch.dtype) -> None:
    """The C kernel's FP8 / INT8 / INT4 fake quantization has the reference path's bits on every
    case, along the last and the first axis for row and group formats (tiles: the last two dims;
    per tensor: a calibrated range too), and the default backend takes it on CPU."""
    lib = backend[0].keywords["lib"]
    fmt = get_format(name)
    assert supports(fmt, torch.zeros(2, 2, dtype=dtype)) == ""
    for case, make in AFFINE_CASES.items():
        x = make(fmt).to(dtype)
        for axis in (-1, 0) if fmt.grouping in ("row", "block") else (-1,):
            want = fake_quantize(x, name, axis=axis, backend="reference")
            got = fake_quantize_affine(x, fmt, axis % x.dim(), None, lib=lib)
            assert_same_bits(got, want, f"{name}/{case}/axis={axis}")
    if fmt.grouping == "tensor":
        x = data.normal((64, 64), seed=10).to(dtype)
        amax = torch.tensor(2.5).reshape(1, 1)
        want = fake_quantize(x, name, calibrated_amax=2.5, backend="reference")
        assert_same_bits(fake_quantize_affine(x, fmt, 0, amax, lib=lib), want, f"{name}/calibrated")
    # a 1-D tensor, one row, of more 128-groups than the kernel keeps at once (2048, STATS_CHUNK)
    vector = data.normal((2048 * 128 + 300,), seed=11).to(dtype)
    want = fake_quantize(vector, name, backend="reference") if fmt.grouping != "tile" else None
    if want is not None:
        assert_same_bits(fake_quantize_affine(vector, fmt, 0, None, lib=lib), want, f"{name}/1-D")
