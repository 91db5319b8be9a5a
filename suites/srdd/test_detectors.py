"""SRDD detectors on the model under test, per format x point x detector, against baselines and
against what is known about the formats (their Gaussian floors)."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import fake_quantize, get_format, list_formats, representable_max
from harness.inject import causal_at
from harness.srdd.metrics import QuantErrorStats
from harness.testing import format_marks

pytestmark = pytest.mark.srdd
DETECTORS = ("sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error")
POINT_IDS = {"weight": "w4a16", "input": "w16a4"}
INPUT_IN_CI = ("mxfp4", "mxfp8_e4m3")  # an activation scan of 32 prompts takes ~60 s here


def pooled(result, kind: str) -> QuantErrorStats:
    total = QuantErrorStats()
    for kinds in result.modules.values():
        if kind in kinds:
            total.merge(kinds[kind])
    return total


def cases() -> list:
    params = []
    for fmt in list_formats():
        for point, pid in POINT_IDS.items():
            if not causal_at(fmt, point):
                continue
            slow = point == "input" and fmt not in INPUT_IN_CI
            for det in DETECTORS:
                marks = format_marks(fmt) + ([pytest.mark.slow] if slow else [])
                params.append(pytest.param(fmt, point, det, id=f"{fmt}-{pid}-{det}", marks=marks))
    return params


@pytest.mark.parametrize("fmt, point, detector", cases())
def test_detector_against_baseline(fmt, point, detector, weight_scan_of, input_scan_of, baseline, metrics) -> None:
    result = weight_scan_of(fmt) if point == "weight" else input_scan_of(fmt)
    value = pooled(result, point).as_dict()[detector]
    assert math.isfinite(value)
    metrics.record(**{detector: value})
    baseline.check(f"{fmt}-{POINT_IDS[point]}-{detector}", {detector: value})


@pytest.mark.mxfp4
def test_weight_scan_covers_every_decoder_linear_and_matches_a_direct_recomputation(
    model_under_test, weight_scan_of
) -> None:
    """All 210 decoder Linears of SmolLM2 (7 per layer), and the scan's SQNR / deadzone equal a
    plain float64 recomputation from the definitions to 1e-4."""
    model = model_under_test.model
    result = weight_scan_of("mxfp4")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(result.modules) == set(linears)
    if model.config.num_hidden_layers == 30:
        assert len(result.modules) == 210
    for name in list(linears)[::37]:
        w = linears[name].weight.detach().double()
        q = fake_quantize(linears[name].weight.detach(), "mxfp4").double()
        sqnr = 10 * math.log10((w**2).sum().item() / ((w - q) ** 2).sum().item())
        dead = ((w != 0) & (q == 0)).sum().item() / (w != 0).sum().item()
        stats = result.modules[name]["weight"]
        assert stats.sqnr_db == pytest.approx(sqnr, abs=1e-4) and stats.deadzone_ratio == pytest.approx(dead, abs=1e-4)


@pytest.mark.mxfp8
def test_every_mxfp8_weight_is_above_the_format_floor(weight_scan_of, metrics) -> None:
    """Floor derived from the element format alone, valid for any distribution: rounding to
    nearest with m mantissa bits leaves every normal-range element within half an ulp,
    |x − q| ≤ 2**−(m+1)·|x|, so SQNR ≥ 20·log10(2**(m+1)) = 24.08 dB for E4M3 (m = 3).  Only
    clipped values (FLOOR scaling clips above 448 of [256, 512): < 1 % of SmolLM2's weights) and
    subnormals could break it.  The Gaussian floor of the formats suite (30.53 dB) does not hold
    for real weights: measured on SmolLM2, minimum 29.79 dB over 210 weights, pooled 30.24 dB."""
    m = get_format("mxfp8_e4m3").element.mbits
    floor = 20 * math.log10(2 ** (m + 1))
    values = {n: kinds["weight"].sqnr_db for n, kinds in weight_scan_of("mxfp8_e4m3").modules.items()}
    metrics.record(min_weight_sqnr_db=min(values.values()), floor_db=floor)
    assert min(values.values()) > floor, sorted(values.items(), key=lambda kv: kv[1])[:3]


@pytest.mark.mxfp4
@pytest.mark.mxfp8
def test_mxfp4_deadzone_is_above_mxfp8_in_every_layer(weight_scan_of, findings_of) -> None:
    fp4 = {f.name: f.metrics["weight_deadzone_ratio"] for f in findings_of(weight_scan_of("mxfp4"))}
    fp8 = {f.name: f.metrics["weight_deadzone_ratio"] for f in findings_of(weight_scan_of("mxfp8_e4m3"))}
    assert all(fp4[n] > fp8[n] for n in fp4), {n: (fp4[n], fp8[n]) for n in fp4 if fp4[n] <= fp8[n]}


@pytest.mark.mxfp4
def test_saturated_values_are_exactly_the_clipped_ones(model_under_test) -> None:
    """Every weight above its block's largest representable value comes out at exactly that
    value (clipped), and every other weight is rounded within half a grid step of itself."""
    model = model_under_test.model
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    limit = representable_max(w, "mxfp4")
    q = fake_quantize(w, "mxfp4")
    over = w.abs() > limit
    assert over.sum() > 0
    assert torch.equal(q[over].abs(), limit[over])
    assert torch.all((q[~over] - w[~over]).abs() <= limit[~over] / 6)  # half the top step (1 of 6 max)
