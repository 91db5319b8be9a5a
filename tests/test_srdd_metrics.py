"""SRDD detectors on cases with known answers, and streaming == one-shot."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import fake_quantize, representable_max
from harness.srdd.metrics import (
    Moments,
    OutputErrorStats,
    Peak,
    QuantErrorStats,
    clip_threshold,
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


def test_saturation_counts_only_clipping_that_changes_the_result() -> None:
    """An MXFP4 block whose amax is in [4, 8): scale 2**(2-2) = 1, largest representable 6, top
    grid step 6 − 4 = 2.  Values in (6, 7] round to 6 with or without clipping (7 is the midpoint
    to the next step, 8); only the k values placed in (7, 7.5] are clipped at a cost."""
    for k in (1, 3, 5):
        block = torch.linspace(-3.0, 3.0, 32)
        block[:4] = torch.tensor([6.25, 6.5, 6.75, 7.0])  # above 6 but clipping costs nothing
        block[4 : 4 + k] = torch.linspace(7.1, 7.5, k)
        clip_at = clip_threshold(block, "mxfp4")
        assert torch.all(clip_at == 7.0) and torch.all(representable_max(block, "mxfp4") == 6.0)
        assert saturation_ratio(block, clip_at) == k / 32
        q = fake_quantize(block, "mxfp4")
        assert torch.all(q[: 4 + k] == 6.0)
        stats = QuantErrorStats().update(block, q, clip_at)
        err2 = (block - q) ** 2
        assert stats.clip_share == pytest.approx(float(err2[4 : 4 + k].sum() / err2.sum()), rel=1e-6)


def test_clip_threshold_of_each_element_is_max_plus_half_the_top_step() -> None:
    """E4M3: max 448, top step 448 − 416 = 32 → 464 = 448 · (1 + 16/448) at scale 1."""
    x = torch.full((32,), 300.0)  # amax in [256, 512): E8M0 scale 2**(8 − 8) = 1
    assert torch.all(clip_threshold(x, "mxfp8_e4m3") == 464.0)
    assert torch.all(clip_threshold(torch.full((32,), 5.0), "mxfp6_e2m3") == 7.75)  # 7.5 + 0.5 / 2


def test_non_finite_values_are_counted_and_left_out_of_the_other_sums() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    q = torch.tensor([1.0, 1.0, 1.0, 1.0])
    stats = QuantErrorStats().update(x, q)
    assert stats.nonfinite == 2 and stats.count == 2
    assert stats.sqnr_db == pytest.approx(10 * math.log10(5 / 1))


def test_output_error_is_the_relative_norm_of_the_weight_error_on_the_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(8, 64, generator=g), torch.randn(10, 64, generator=g)
    q = fake_quantize(w, "mxfp4")
    stats = OutputErrorStats().update(x[:4], w, q).update(x[4:], w, q)  # streaming over batches
    direct = torch.linalg.norm(x.double() @ (w - q).double().T) / torch.linalg.norm(x.double() @ w.double().T)
    assert stats.output_error == pytest.approx(float(direct), rel=1e-9)


def test_peak_finds_the_largest_magnitude_and_where() -> None:
    h = torch.zeros(5, 7)
    h[3, 4] = -9.0
    h[1, 2] = 8.0
    peak = Peak().update(h, torch.tensor([0, 1, 2, 10, 11]))
    assert (peak.value, peak.position, peak.dim) == (9.0, 10, 4)
    peak.update(torch.full((2, 7), 3.0), torch.tensor([0, 1]))  # smaller: unchanged
    assert peak.value == 9.0


def test_kurtosis_known_values() -> None:
    assert kurtosis(torch.tensor([-1.0, 1.0] * 100)) == pytest.approx(1.0)
    g = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))
    assert kurtosis(g) == pytest.approx(3.0, abs=0.02)
    assert kurtosis(g + 5.0) == pytest.approx(3.0, abs=0.02)  # central moments


def test_residual_branch_gain_of_a_linear_block() -> None:
    """f(h) = h + 3h: the identity path is removed, the branch's gain is 3; with ``keep``, only
    the kept rows count (δ is zero on the others, whose output is then not compared)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(4, 8, generator=g, dtype=torch.float64)
    delta = torch.randn(4, 8, generator=g, dtype=torch.float64) * 1e-2
    assert gain(lambda t: t + 3.0 * t, h, delta) == pytest.approx(3.0, rel=1e-9)
    keep = torch.tensor([False, True, True, False])

    def leaky(t):  # a block that also writes 100·t[0] into every row: only kept rows are measured
        return t + 3.0 * t + 100.0 * t[:1]

    assert gain(leaky, h, delta * keep[:, None], keep) == pytest.approx(3.0, rel=1e-9)


def test_instability() -> None:
    run = torch.randn(10, 16)
    assert instability(torch.stack([run, run, run])) == 0.0
    runs = torch.stack([torch.full((4,), 1.0), torch.full((4,), 3.0)])  # mean 2, std 1 everywhere
    assert instability(runs) == pytest.approx(1 / 2)


def test_streaming_equals_one_shot() -> None:
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    q = fake_quantize(x, "mxfp4")
    limit = clip_threshold(x, "mxfp4")
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
