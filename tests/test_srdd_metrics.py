"""SRDD detectors on cases with known answers, and streaming == one-shot."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import fake_quantize, representable_max
from harness.srdd.metrics import (
    Moments,
    QuantErrorStats,
    deadzone_ratio,
    gain,
    instability,
    kurtosis,
    relative_error,
    saturation_ratio,
    sqnr_db,
)


def test_sqnr_of_a_uniform_quantizer_is_6_02_db_per_bit() -> None:
    """x ~ U(-1, 1) through a b-bit uniform quantizer (step 2/2**b): signal 1/3, noise
    step**2/12 = 1/(3 * 4**b), so SQNR = 10 log10(4**b) = 6.02 b dB."""
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for bits in (4, 6, 8):
        step = 2 / 2**bits
        q = (torch.floor(x / step) + 0.5) * step  # mid-rise: error uniform in [-step/2, step/2)
        assert sqnr_db(x, q) == pytest.approx(10 * math.log10(4**bits), abs=0.05)


def test_sqnr_edge_cases() -> None:
    x = torch.tensor([1.0, -2.0])
    assert sqnr_db(x, x) == math.inf
    assert math.isnan(sqnr_db(torch.zeros(3), torch.ones(3)))


def test_deadzone_and_relative_error_known_counts() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 1e-3, -4.0])
    q = torch.tensor([0.0, 1.5, 2.0, 0.0, -4.0])
    assert deadzone_ratio(x, q) == 1 / 4  # the 1e-3 of four non-zeros
    assert relative_error(x, q) == pytest.approx((0.5 + 0 + 1 + 0) / 4)


def test_saturation_counts_exactly_the_clipped_values() -> None:
    """An MXFP4 block whose amax is in [4, 8): scale 2**(2-2) = 1, largest representable 6, so
    exactly the k values placed in (6, 7.5] are clipped (to 6)."""
    for k in (1, 3, 5):
        block = torch.linspace(-3.0, 3.0, 32)
        block[:k] = torch.linspace(6.25, 7.5, k)
        limit = representable_max(block, "mxfp4")
        assert torch.all(limit == 6.0)
        assert saturation_ratio(block, limit) == k / 32
        assert torch.all(fake_quantize(block, "mxfp4")[:k] == 6.0)


def test_kurtosis_known_values() -> None:
    assert kurtosis(torch.tensor([-1.0, 1.0] * 100)) == pytest.approx(1.0)
    g = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    assert kurtosis(g) == pytest.approx(3.0, abs=0.02)
    assert kurtosis(g + 5.0) == pytest.approx(3.0, abs=0.02)  # central moments


def test_gain_of_a_linear_map() -> None:
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 8, generator=g, dtype=torch.float64)
    delta = torch.randn(4, 8, generator=g, dtype=torch.float64) * 1e-2
    assert gain(lambda t: 3.0 * t, h, delta) == pytest.approx(3.0, rel=1e-9)


def test_instability() -> None:
    run = torch.randn(10, 16)
    assert instability(torch.stack([run, run, run])) == 0.0
    runs = torch.stack([torch.full((4,), 1.0), torch.full((4,), 3.0)])  # mean 2, std 1 everywhere
    assert instability(runs) == pytest.approx(1 / 2)


def test_streaming_equals_one_shot() -> None:
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    q = fake_quantize(x, "mxfp4")
    limit = representable_max(x, "mxfp4")
    whole = QuantErrorStats().update(x, q, limit)
    parts = QuantErrorStats()
    for chunk in range(0, 64, 16):
        parts.merge(QuantErrorStats().update(x[chunk : chunk + 16], q[chunk : chunk + 16], limit[chunk : chunk + 16]))
    for key, value in whole.as_dict().items():
        assert parts.as_dict()[key] == pytest.approx(value, rel=1e-12)
    moments = Moments()
    for chunk in x.split(7):
        moments.update(chunk)
    assert moments.kurtosis == pytest.approx(kurtosis(x), rel=1e-9)
