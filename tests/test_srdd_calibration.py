"""The scan's verdicts are calibrated: a clean model (i.i.d. Gaussian weights, HF's initialisation)
is flagged in at most 5 % of seeded scans, for 6 and 30 layers and each format, and a planted
defect (2 outliers per row of every Linear of layer 3) is found, with the detection rate recorded
for each strength.  The models are small (hidden 32: one MX block per row; 16 evaluation items in
one batch) so that the 120 clean and 160 planted scans take about five minutes in CI."""

from __future__ import annotations

import pytest
from srdd_models import ITEMS, PLANTED, gaussian_model, plant_outliers, scan

from harness.srdd.criteria import Rules, log_outliers, outliers

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


# Planted outliers at k σ times a factor uniform in [1, 1.25]: with one shared magnitude, where it
# falls on the format's grid decides, and detection is not even monotone in k
# (docs/measurements/2026-12-02-planted-outliers.md).
SIGMAS = (4.0, 6.0, 8.0, 12.0)
SPREAD = 0.25
FOUND_FROM = 8.0  # sigma from which every FP4 format must find the planted layer


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_planted_outliers_are_found_from_8_sigma_and_no_other_layer_is_flagged(fmt: str, metrics) -> None:
    """The detection curve over ``SIGMAS`` (recorded); >= 95 % of seeds find the planted layer
    from ``FOUND_FROM`` and <= 5 % flag another layer at every σ.  Below it the outliers cost about
    the format error of a smooth heavy-tailed weight (at 4 σ, that of a Student-t(4) weight, which
    no floor rule may flag: tests/test_srdd_criteria.py), so its rates are recorded, not asserted."""
    for sigma in SIGMAS:
        found = elsewhere = 0
        for seed in range(SEEDS):
            model, tok = gaussian_model(seed, **SMALL)
            plant_outliers(model, per_row=2, sigma=sigma, seed=seed, spread=SPREAD)
            doc = cheap_scan(model, tok, fmt)
            found += PLANTED in doc.problematic_layers
            elsewhere += any(name != PLANTED for name in doc.problematic_layers)
        metrics.record(
            **{f"detection_rate_{sigma:g}_sigma": found / SEEDS, f"other_layers_{sigma:g}_sigma": elsewhere / SEEDS}
        )
        assert elsewhere / SEEDS <= 0.05, sigma
        if sigma >= FOUND_FROM:
            assert found / SEEDS >= 0.95, sigma
