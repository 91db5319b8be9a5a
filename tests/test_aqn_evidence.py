"""The AQN judgments rest on the right unit: the pre-flight's verdict on a CI over noise draws,
the strategy comparison's significance on seeds, the targeted layers on attribution CIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from harness.aqn.configs import get_config
from harness.aqn.preflight import Interval, Thresholds, preflight, preflight_items, verdict
from harness.aqn.train import CONTROL, StrategyComparison, harmful_layers, problematic_layers
from harness.eval.loss import answer_logprobs
from harness.eval.stats import compare_paired, compare_seeds
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.models import load_model
from harness.srdd.attribution import NEGLIGIBLE_DELTA
from harness.srdd.document import ScanDocument

# SmolLM2, MXFP4, config 1C, noise seeds 0-5 on 16 items: one draw said `ok`, another `risky`.
ONE_C_INCREASES = [0.026, 0.104, 0.041, 0.078, 0.033, 0.048]
ITEMS = [
    Gsm8kItem(f"What is {a} plus {b}?", f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}")
    for a, b in ((2, 3), (10, 7), (41, 1), (6, 6))
]


@pytest.mark.parametrize(
    "increases, top1, expected",
    [
        ([0.01, 0.02, 0.015, 0.012, 0.018, 0.02, 0.011, 0.016], [0.95] * 7 + [0.94], "ok"),
        ([0.06, 0.14, 0.08, 0.12, 0.07, 0.13, 0.09, 0.11], [0.9] * 7 + [0.91], "borderline"),
        (ONE_C_INCREASES, [0.785, 0.80, 0.79, 0.802, 0.769, 0.795], "borderline"),
        ([0.30, 0.31, 0.29, 0.30, 0.32, 0.28, 0.30, 0.30], [0.7] * 7 + [0.71], "risky"),
        ([1.7, 1.8, 1.6, 1.75, 1.72, 1.69, 1.71, 1.73], [0.3] * 7 + [0.31], "collapse"),
        ([0.3, 0.9, 0.5, 0.7, 0.4, 0.8, 0.6, 0.55], [0.7] * 7 + [0.71], "borderline"),  # straddles collapse
    ],
)
def test_verdict_follows_the_ci_never_one_draw(increases, top1, expected: str) -> None:
    loss_ci, top1_ci = Interval.over(increases), Interval.over(top1)
    half = stats.t.ppf(0.975, len(increases) - 1) * np.std(increases, ddof=1) / np.sqrt(len(increases))
    assert loss_ci.low == pytest.approx(np.mean(increases) - half) and loss_ci.high == pytest.approx(
        np.mean(increases) + half
    )
    assert verdict(loss_ci, top1_ci) == expected
    if expected == "borderline" and increases is ONE_C_INCREASES:  # the old one-draw verdicts disagreed
        assert {verdict(Interval.over([x, x]), Interval.over([t, t])) for x, t in zip(increases, top1)} == {
            "ok",
            "risky",
        }


def test_preflight_over_draws_on_a_tiny_model_reuses_the_clean_pass() -> None:
    """8 draws on tiny-llama (1A: sigma 0.05 on every Linear): one value per draw, seeds 0-7, the CI
    contains the mean of the draws; the same numbers with the clean pass given; a verdict line put
    at the measured mean makes the case borderline (the CI straddles it)."""
    model, tok = load_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = get_config("1A")
    result = preflight(model, tok, ITEMS, config, draws=8, batch_size=4)
    increases = [d["loss_increase"] for d in result.draws]
    assert [d["seed"] for d in result.draws] == list(range(8)) and len(set(increases)) == 8
    assert result.loss_increase.mean == pytest.approx(np.mean(increases))
    assert result.loss_increase.low < np.mean(increases) < result.loss_increase.high
    assert result.top1_agree.low <= result.top1_agree.mean <= result.top1_agree.high
    assert result.verdict == verdict(result.loss_increase, result.top1_agree)
    with QuantInjector(model, "mxfp4", "weight"):
        clean = answer_logprobs(model, tok, preflight_items(ITEMS), batch_size=4)
    again = preflight(model, tok, ITEMS, config, draws=8, batch_size=4, clean=clean)
    assert again.draws == result.draws
    planted = Thresholds(risky_loss_increase=result.loss_increase.mean, risky_top1=0.0, collapse_top1=0.0)
    assert verdict(result.loss_increase, result.top1_agree, planted) == "borderline"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="draws must be >= 2"):
        preflight(model, tok, ITEMS, config, draws=1)


def test_preflight_items_cut_answers_to_their_first_lines_and_sort() -> None:
    cut = preflight_items(ITEMS)
    assert cut[0].answer == "2 + 3 = <<2+3=5>>5" and all("####" not in i.answer for i in cut)
    assert [len(i.text) for i in cut] == sorted(len(i.text) for i in cut) and preflight_items(cut) == cut
    assert {i.answer for i in preflight_items(ITEMS, 0)} == {i.answer for i in ITEMS}
    with pytest.raises(ValueError, match="answer_lines must be >= 0"):
        preflight_items(ITEMS, -1)


def test_three_nearly_identical_runs_are_not_significant_however_many_items() -> None:
    """The committed sample's per-seed differences of global vs none (+0.0036, -0.0004, +0.0034):
    over 3 seeds p = 0.24, n.s.; the old test over 2000 items of seed-averaged losses called the
    same runs significant."""
    rng = np.random.default_rng(0)
    items = rng.normal(1.3, 0.4, 2000)
    none = [items + rng.normal(0, 0.05, 2000) for _ in range(3)]
    offsets = [0.0036, -0.0004, 0.0034]
    glob = [run + off + rng.normal(0, 0.05, 2000) for run, off in zip(none, offsets)]
    comparison = StrategyComparison("mxfp4", "qerl-nvfp4", ["none", "global"], [0, 1, 2], 10)
    comparison.per_seed_loss = {"none": [r.mean() for r in none], "global": [r.mean() for r in glob]}
    row = {r["strategy"]: r for r in comparison.rows()}["global"]
    diffs = np.subtract(comparison.per_seed_loss["global"], comparison.per_seed_loss["none"])
    assert row["vs_none"]["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert row["vs_none"]["p_value"] > 0.05 and not row["vs_none"]["significant"]
    assert row["vs_none"]["ci_low"] < 0 < row["vs_none"]["ci_high"]
    old = compare_paired(np.mean(none, axis=0), np.mean(glob, axis=0))  # items as replicates
    assert old.significant


def test_seed_comparison_and_the_gap_to_the_unquantized_control() -> None:
    """Five seeds, AQN lowering the quantized loss by 0.02 with seed noise 0.002: significant;
    each strategy's gap to the control is its loss minus the control's, seed by seed."""
    none = [1.40, 1.41, 1.39, 1.40, 1.42]
    comparison = StrategyComparison("mxfp4", "c", ["none", "global"], list(range(5)), 10)
    comparison.per_seed_loss = {
        "none": none,
        "global": [x - 0.02 + e for x, e in zip(none, (0.001, -0.002, 0.0, 0.002, -0.001))],
        CONTROL: [x - 0.1 for x in none],
    }
    rows = {r["strategy"]: r for r in comparison.rows()}
    assert rows["global"]["vs_none"]["significant"] and rows["global"]["vs_none"]["mean_diff"] == pytest.approx(-0.02)
    assert rows["none"]["gap"]["mean_diff"] == pytest.approx(0.1) and rows["global"]["gap"][
        "mean_diff"
    ] == pytest.approx(0.08)
    assert "vs_none" not in rows["none"] and "gap" not in rows[CONTROL]
    assert compare_seeds([1.0, 1.0], [1.0, 1.0]).label == "n.s."
    with pytest.raises(ValueError, match="same seeds"):
        compare_seeds([1.0], [1.0, 2.0])


SCAN = Path(__file__).parents[1] / "reports/sample/aqn-smollm2-135m-mxfp4-attribution.json"


def test_targeted_layers_are_the_scans_harmful_layers() -> None:
    """The same rule as the scan's verdicts and recommendation: Δloss CI above the band δ."""
    doc = ScanDocument.read(SCAN)
    layers = harmful_layers(doc.attribution)
    ci = {a.layer: a.ci for a in doc.attribution}
    assert layers[:3] == ["model.layers.2", "model.layers.16", "model.layers.12"]
    assert all(ci[name][0] > NEGLIGIBLE_DELTA for name in layers) and len(layers) == 20
    assert {"model.layers.10", "model.layers.27", "model.layers.23"}.isdisjoint(layers)  # below 0, or inside δ


def test_problematic_layers_come_from_a_scan_json_or_targeted_is_refused(tmp_path) -> None:
    layers, how = problematic_layers(["none", "targeted", "healthy"], str(SCAN), model="m", fmt="nvfp4")
    assert layers == harmful_layers(ScanDocument.read(SCAN).attribution) and str(SCAN) in how
    assert problematic_layers(["none", "global"], None, model="m", fmt="nvfp4") == ([], "no attribution given")
    with pytest.raises(ValueError, match=r"targeted/healthy need --attribution SCAN.json.*--model m --format nvfp4"):
        problematic_layers(["none", "healthy"], None, model="m", fmt="nvfp4")
    with pytest.raises(
        ValueError, match="unknown AQN strategy 'random'; valid AQN strategies: none, global, targeted, healthy"
    ):
        problematic_layers(["none", "random"], str(SCAN), model="m", fmt="nvfp4")
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"layers": []}))
    with pytest.raises(ValueError, match=r"scan\.json is not a scan JSON"):
        problematic_layers(["targeted"], str(scan), model="m", fmt="nvfp4")
