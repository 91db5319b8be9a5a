"""What each format does to the model under test: answer-token loss, KL(ref || quant) and top-1
agreement on the first 32 GSM8K test items, against stored baselines and against what is known
about the formats.  Every comparison with the reference is paired and reports its p-value."""

from __future__ import annotations

import pytest

from harness.eval import REFERENCE
from harness.eval.stats import compare_paired
from harness.formats import get_format, list_formats
from harness.inject import causal_at
from harness.testing import format_marks

POINT_IDS = {"weight": "w4a16", "input": "w16a4", "both": "w4a4"}
# Run in CI (CPU, ~30 s per evaluation): every format on weights, and the three points for MXFP4;
# the other formats' activation points run with -m FORMAT / -m slow (and nightly on the GPU).
# Per-tensor formats need calibration at the input.
FAST = {(f, "weight") for f in list_formats()} | {("mxfp4", p) for p in POINT_IDS}


def case_params() -> list:
    params = []
    for fmt in list_formats():
        for point, pid in POINT_IDS.items():
            if not causal_at(fmt, point):
                continue
            marks = format_marks(fmt) + ([] if (fmt, point) in FAST else [pytest.mark.slow])
            params.append(pytest.param(fmt, point, id=f"{fmt}-{pid}", marks=marks))
    return params


def test_reference_loss_against_baseline(
    model_under_test, loss_items, reference, quantized_loss, baseline, metrics
) -> None:
    result = quantized_loss("mxfp8_e4m3", "weight")  # any case: the reference side is shared
    summary = result.summary()
    metrics.record(reference_loss=summary["reference_loss"], n=summary["n"])
    baseline.check(f"{REFERENCE}-{model_under_test.dtype_id}", {"reference_loss": summary["reference_loss"]})


@pytest.mark.parametrize("fmt, point", case_params())
def test_format_against_baseline(
    fmt: str, point: str, model_under_test, quantized_loss, coverages, baseline, metrics
) -> None:
    result = quantized_loss(fmt, point)
    s = result.summary()
    cmp = result.comparison()
    coverage = coverages[fmt, point, "floor"]
    metrics.record(
        loss=s["loss"], kl=s["kl"], top1_agree=s["top1_agree"], p_value=cmp.p_value, n=cmp.n, coverage=coverage.share
    )
    assert coverage.complete and coverage.share == 1.0, coverage.line()
    assert cmp.n >= 30 and not cmp.underpowered
    assert s["loss"] >= s["reference_loss"] - 0.01, "quantization made the model clearly better: injector broken?"
    assert s["kl"] > 0 and 0 < s["top1_agree"] < 1
    baseline.check(
        f"{fmt}-{POINT_IDS[point]}-{model_under_test.dtype_id}",
        {"loss": s["loss"], "kl": s["kl"], "top1_agree": s["top1_agree"]},
    )


ORDER = ("mxfp8_e4m3", "mxfp6_e3m2", "mxfp4")
BY_MANTISSA = ("mxfp8_e4m3", "mxfp6_e2m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp4", "nvfp4")


@pytest.mark.parametrize("names", [pytest.param(ORDER, id="-".join(ORDER), marks=format_marks(*ORDER))])
def test_fewer_bits_cost_more(names: tuple[str, ...], quantized_loss) -> None:
    """W4A16 loss and KL: mxfp8_e4m3 < mxfp6_e3m2 < mxfp4, and MXFP4's loss increase over the
    reference is significant on the paired per-item losses."""
    for metric in ("loss", "kl"):
        values = [quantized_loss(n, "weight").summary()[metric] for n in names]
        assert values == sorted(values), (metric, dict(zip(names, values)))
    cmp = quantized_loss("mxfp4", "weight").comparison()
    assert cmp.significant and cmp.mean_diff > 0, cmp


@pytest.mark.parametrize("names", [pytest.param(BY_MANTISSA, id="by-mantissa-bits", marks=format_marks(*BY_MANTISSA))])
def test_mantissa_bits_set_the_cost(names: tuple[str, ...], quantized_loss) -> None:
    """What orders the formats on weights is the element's mantissa, not its total width: every
    3-mantissa-bit format (E4M3, E2M3) has a lower W4A16 KL than every 2-bit one (E5M2, E3M2),
    and those lower than every 1-bit one (MXFP4, NVFP4).  Measured on SmolLM2: E2M3 0.027 and
    E4M3 0.031 (MXFP6 E2M3 edges out MXFP8 E4M3, as in the formats suite's SQNR: FLOOR scaling
    clips E4M3 blocks more often), E3M2 and E5M2 0.099, NVFP4 0.22, MXFP4 0.43."""
    kl = {n: quantized_loss(n, "weight").summary()["kl"] for n in names}
    groups: dict[int, list[float]] = {}
    for n in names:
        groups.setdefault(get_format(n).element.mbits, []).append(kl[n])
    assert max(groups[3]) < min(groups[2]) and max(groups[2]) < min(groups[1]), kl


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("mxfp4", id="mxfp4", marks=format_marks("mxfp4")),
        pytest.param("nvfp4", id="nvfp4", marks=[*format_marks("nvfp4"), pytest.mark.slow]),
    ],
)
def test_w4a4_costs_more_than_either_alone(fmt: str, quantized_loss) -> None:
    losses = {p: quantized_loss(fmt, p).summary()["loss"] for p in POINT_IDS}
    assert losses["both"] > max(losses["weight"], losses["input"]), losses
    assert get_format(fmt).element.bits == 4


@pytest.mark.mxfp4
def test_a_ceil_type_scale_mode_recovers_part_of_the_mxfp4_loss(quantized_loss, metrics) -> None:
    """FLOOR clips a block's max whenever its significand exceeds E2M1's 1.5 (6 = 1.5 * 2**2);
    RCEIL never clips, at the price of a coarser grid for some blocks. On SmolLM2 W4A16 (32
    items, CPU) the per-item loss drops from 1.883 to 1.819 (paired mean -0.064, 95 % CI
    [-0.096, -0.029], p = 0.0009, 26 of 32 items better): 15 % of MXFP4's gap to the reference
    (token-weighted loss 1.8200 -> 1.7578, reference 1.4036)."""
    floor, rceil = quantized_loss("mxfp4", "weight"), quantized_loss("mxfp4", "weight", "rceil")
    cmp = compare_paired(floor.item_losses(floor.nll), rceil.item_losses(rceil.nll))
    f, r = floor.summary(), rceil.summary()
    recovered = (f["loss"] - r["loss"]) / (f["loss"] - f["reference_loss"])
    metrics.record(loss_floor=f["loss"], loss_rceil=r["loss"], gap_recovered=recovered, p_value=cmp.p_value)
    assert cmp.significant and cmp.mean_diff < 0, cmp
