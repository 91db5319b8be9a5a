"""The scan's verdicts are calibrated: a clean model (i.i.d. Gaussian weights, HF's initialisation)
is flagged in at most 5 % of seeded scans, for 6 and 30 layers and each format, and a planted
defect (2 outliers per row of every Linear of layer 3) is found from 4 sigma.  The models are
small (hidden 32: one MX block per row; 16 evaluation items in one batch) so that 120 clean scans
fit in CI."""

from __future__ import annotations

import pytest
from srdd_models import ITEMS, PLANTED, gaussian_model, plant_outliers, scan

from harness.srdd.criteria import Rules, log_outliers, outliers

# 20 seeds x 6 cases of whole scans: ~10 min on 2 cores, so `slow` until the scans are cheaper
pytestmark = pytest.mark.slow
SEEDS = 20
FORMATS = ["mxfp4", "nvfp4", "mxfp8_e4m3"]
SMALL = {"hidden": 32, "intermediate": 64, "heads": 2}


def cheap_scan(model, tok, fmt: str):
    """The default scan (screen + exact rows, every verdict rule) without the plots' extras: no gain
    scan, no verification, 16 evaluation items in one batch."""
    return scan(model, tok, fmt, evaluation=ITEMS[:16], do_verify=False, gain=False, batch_size=16)


@pytest.mark.parametrize("layers", [6, 30])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_clean_gaussian_model_is_flagged_in_at_most_5_percent_of_scans(fmt: str, layers: int, metrics) -> None:
    """Family-wise over every rule of the whole scan.  Beside it, the attribution outlier rule
    alone (log KL or log Δloss, without the harm requirement) and the old rule (robust z on raw
    KL, 3.5, 1.25x the median), which flagged 22 % of 6-layer and 67 % of 30-layer clean scans."""
    rules = Rules()
    flagged = log_rule = raw_kl = 0
    for seed in range(SEEDS):
        model, tok = gaussian_model(seed, layers, **SMALL)
        doc = cheap_scan(model, tok, fmt)
        flagged += bool(doc.problematic_layers)
        exact = {a.layer: a for a in doc.attribution[1:]}
        kl = {s.layer: s.kl for s in doc.screen} | {name: a.kl for name, a in exact.items()}
        delta = {s.layer: s.delta_loss for s in doc.screen} | {name: a.delta_loss for name, a in exact.items()}
        log_rule += bool(log_outliers(kl, rules) or log_outliers(delta, rules))
        raw_kl += bool(outliers(kl, rules, lambda v, med: v > rules.outlier_factor * med))
    metrics.record(false_positive_rate=flagged / SEEDS, log_rule_rate=log_rule / SEEDS, raw_kl_rule_rate=raw_kl / SEEDS)
    assert flagged / SEEDS <= 0.05
    assert log_rule / SEEDS <= 0.05


@pytest.mark.parametrize(
    "fmt, sigma",
    [
        ("mxfp4", 4.0),
        ("mxfp4", 6.0),
        ("nvfp4", 4.0),
        pytest.param(
            "nvfp4",
            6.0,
            marks=pytest.mark.xfail(
                strict=True,
                reason="known gap: at 6 sigma the outliers' own energy lifts the tensor's NVFP4 SQNR above its "
                "floor and its deadzone stays under 2x the floor's; no weight rule fires",
            ),
        ),
    ],
)
def test_a_planted_defect_is_found_in_at_least_95_percent_of_seeds(fmt: str, sigma: float, metrics) -> None:
    found = elsewhere = 0
    for seed in range(SEEDS):
        model, tok = gaussian_model(seed, **SMALL)
        plant_outliers(model, per_row=2, sigma=sigma, seed=seed)
        doc = cheap_scan(model, tok, fmt)
        found += PLANTED in doc.problematic_layers
        elsewhere += any(name != PLANTED for name in doc.problematic_layers)
    metrics.record(detection_rate=found / SEEDS, other_layers_flagged=elsewhere / SEEDS)
    assert found / SEEDS >= 0.95
    assert elsewhere / SEEDS <= 0.05
