"""Speed of fake_quantize per format (pytest-benchmark, marker ``bench``).

Every case stores its throughput (GB/s read + written) and its median time relative to
``x.clone()`` of the same tensor measured in the same process (``extra_info``), so numbers from
different machines compare as ratios. On CUDA every timed call ends in
``torch.cuda.synchronize()`` (the kernel, not its launch, is timed) and ``clone`` is timed with
``triton.testing.do_bench``.  torchao's MX/NVFP4 cast + dequantize is benchmarked beside ours
(every format it has, fp32 and bf16), and ``quantize`` (codes + scales) beside ``fake_quantize``.
Run: ``pytest suites/bench -m bench --benchmark-only`` (``make bench``); the side-by-side table of
the same measurements (paired rounds) is ``python -m benchmarks.bandwidth`` (docs/speed.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bandwidth import median_ms, torchao_fake_quantize
from harness.formats import fake_quantize, get_format, quantize
from harness.testing import format_params

pytestmark = pytest.mark.bench
SIZES = {"1024x1024": (1024, 1024), "4096x4096": (4096, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADLINE = ["mxfp4", "mxfp8_e4m3", "nvfp4"]


def synced(fn, x: torch.Tensor):
    """``fn`` followed by a CUDA synchronisation when ``x`` is on CUDA (else ``fn`` itself)."""
    if x.device.type != "cuda":
        return fn

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(x.device)
        return out

    return call


def record(benchmark, metrics, x: torch.Tensor) -> None:
    """GB/s read + written and the ratio of the median time to ``clone`` of the same tensor, in
    the benchmark JSON (``extra_info``) and in the run's "harness metrics" table."""
    benchmark.extra_info["clone_s"] = clone = median_ms(x.clone, x.device) / 1e3
    stats = getattr(benchmark, "stats", None)
    if stats:  # None under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["gb_per_s"] = gbps = 2 * x.numel() * x.element_size() / median / 1e9
        benchmark.extra_info["ratio_to_clone"] = ratio = median / clone
        metrics.record(ms=median * 1e3, gb_per_s=gbps, ratio_to_clone=ratio)


@pytest.fixture(scope="module")
def tensors(device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        (s, d): torch.randn(shape, generator=g).to(device, dtype)
        for s, shape in SIZES.items()
        for d, dtype in DTYPES.items()
    }


def _generator(name: str, x: torch.Tensor) -> torch.Generator | None:
    return torch.Generator(x.device).manual_seed(0) if get_format(name).stochastic else None


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", format_params())
def test_fake_quantize_speed(benchmark, metrics, name: str, size: str, dtype: str, tensors) -> None:
    """The default path (the C fast path where the format has one)."""
    x = tensors[size, dtype]
    benchmark.group = f"fake_quantize-{size}-{dtype}"
    out = benchmark(synced(fake_quantize, x), x, name, generator=_generator(name, x))
    record(benchmark, metrics, x)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("name", format_params(HEADLINE))
def test_reference_path_speed(benchmark, metrics, name: str, tensors) -> None:
    """The tensor-op reference path, which the fast path is bit-identical to."""
    x = tensors["4096x4096", "fp32"]
    benchmark.group = "fake_quantize-4096x4096-fp32"
    out = benchmark(synced(fake_quantize, x), x, name, backend="reference")
    record(benchmark, metrics, x)
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", format_params())
def test_quantize_speed(benchmark, metrics, name: str, dtype: str, tensors) -> None:
    """Real quantization (packed codes + scales) on the default path (the same fast kernels)."""
    x = tensors["4096x4096", dtype]
    benchmark.group = f"quantize-4096x4096-{dtype}"
    q = benchmark(synced(quantize, x), x, name, generator=_generator(name, x))
    record(benchmark, metrics, x)
    assert q.shape == tuple(x.shape)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", format_params())
def test_torchao_reference_speed(benchmark, metrics, name: str, dtype: str, tensors) -> None:
    """torchao's ``to_mx(...).dequantize()`` / ``NVFP4Tensor`` (eager) on the same tensor, for
    every format torchao has (the others skip, saying so)."""
    run = torchao_fake_quantize(name)
    if run is None:
        pytest.skip(f"torchao is not installed or has no {name}")
    x = tensors["4096x4096", dtype]
    benchmark.group = f"fake_quantize-4096x4096-{dtype}"
    out = benchmark(synced(run, x), x)
    record(benchmark, metrics, x)
    assert out.shape == x.shape
