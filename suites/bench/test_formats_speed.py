"""Speed of fake_quantize per format (pytest-benchmark, marker ``bench``).

Every case stores its throughput (GB/s of input read) and its time relative to ``x.clone()``
of the same tensor measured in the same process (``extra_info``), so numbers from different
machines compare as ratios.  torchao's reference MX/NVFP4 path is benchmarked beside ours.
Run: ``pytest suites/bench -m bench --benchmark-only`` (``make bench``).
"""

from __future__ import annotations

import timeit

import pytest
import torch

from harness.formats import fake_quantize, get_format
from harness.testing import format_params

pytestmark = pytest.mark.bench
SHAPE = (4096, 4096)


def clone_seconds(x: torch.Tensor) -> float:
    """Best-of-5 time of ``x.clone()``: the memory-bound reference every ratio is taken to."""
    return min(timeit.repeat(x.clone, number=3, repeat=5)) / 3


def record(benchmark, x: torch.Tensor) -> None:
    benchmark.extra_info["clone_s"] = clone = clone_seconds(x)
    stats = getattr(benchmark, "stats", None)
    if stats:  # None under --benchmark-disable
        mean = stats.stats.mean
        benchmark.extra_info["gb_per_s"] = x.numel() * x.element_size() / mean / 1e9
        benchmark.extra_info["ratio_to_clone"] = mean / clone


@pytest.fixture(scope="module")
def tensor(device: torch.device) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("name", format_params())
def test_fake_quantize_speed(benchmark, name: str, tensor: torch.Tensor) -> None:
    benchmark.group = f"fake_quantize-{'x'.join(map(str, SHAPE))}-fp32"
    g = torch.Generator(tensor.device).manual_seed(0) if get_format(name).stochastic else None
    out = benchmark(fake_quantize, tensor, name, generator=g)
    record(benchmark, tensor)
    assert out.shape == tensor.shape


@pytest.mark.parametrize("name", format_params(["mxfp4", "mxfp8_e4m3", "nvfp4"]))
def test_torchao_reference_speed(benchmark, name: str, tensor: torch.Tensor) -> None:
    parity = pytest.importorskip("suites.formats.test_torchao_parity")
    benchmark.group = f"fake_quantize-{'x'.join(map(str, SHAPE))}-fp32"
    out = benchmark(parity.torchao_fake_quantize, tensor, name)
    record(benchmark, tensor)
    assert out.shape == tensor.shape
