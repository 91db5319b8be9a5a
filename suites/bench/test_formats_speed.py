"""Speed of fake_quantize per format (pytest-benchmark, marker ``bench``).

Every case stores its throughput (GB/s read + written) and its median time relative to
``x.clone()`` of the same tensor measured in the same process (``extra_info``), so numbers from
different machines compare as ratios. On CUDA every timed call ends in
``torch.cuda.synchronize()`` (the kernel, not its launch, is timed) and ``clone`` is timed with
``triton.testing.do_bench``.  torchao's reference MX/NVFP4 path is benchmarked beside ours.
Run: ``pytest suites/bench -m bench --benchmark-only`` (``make bench``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bandwidth import median_ms
from harness.formats import fake_quantize, get_format
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


@pytest.mark.parametrize("name", format_params(HEADLINE))
def test_torchao_reference_speed(benchmark, metrics, name: str, tensors) -> None:
    parity = pytest.importorskip("suites.formats.test_torchao_parity")
    x = tensors["4096x4096", "fp32"]
    benchmark.group = "fake_quantize-4096x4096-fp32"
    out = benchmark(synced(parity.torchao_fake_quantize, x), x, name)
    record(benchmark, metrics, x)
    assert out.shape == x.shape
