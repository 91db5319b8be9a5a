"""The AQN strategy comparison's machinery, on a tiny model so CI runs it (the comparison on the
model under test is `python -m harness aqn compare`, see reports/sample/): every strategy and the
unquantized control train for the same steps on the same batches per seed, the seed is the unit of
every comparison, and nothing is called significant that the seed-level test does not call so."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from harness.aqn.configs import AQNConfig
from harness.aqn.train import CONTROL, compare_strategies
from harness.gsm8k import load_gsm8k
from harness.models import load_model
from harness.modelview import ModelView

pytestmark = [pytest.mark.aqn, pytest.mark.mxfp4]
SEEDS = 5
CONFIG = AQNConfig("short", 0.01, 0.0001, 3, ("rmsnorm",), "qerl-nvfp4's sigmas on a 3-stage schedule")


def test_strategy_comparison_over_seeds_with_an_unquantized_control(pytestconfig) -> None:
    model, tok = load_model("tiny-llama")
    data = pytestconfig.getoption("--gsm8k-dir")
    layers = ModelView(model).layer_names
    result = compare_strategies(
        model,
        tok,
        load_gsm8k("train", 8, data),
        load_gsm8k("test", 4, data),
        fmt="mxfp4",
        config=CONFIG,
        strategies=["none", "global", "targeted"],
        seeds=list(range(SEEDS)),
        steps=3,
        layers=layers,
        problematic=layers[:1],
        train_batch_size=2,
    )
    rows = {r["strategy"]: r for r in result.rows()}
    assert set(rows) == {"none", "global", "targeted", CONTROL}
    assert all(len(v) == SEEDS for v in result.per_seed_loss.values())
    assert len(set(result.per_seed_loss["none"])) == SEEDS  # the seeds are different runs
    for name, row in rows.items():
        assert math.isfinite(row["mean"]) and row["std"] > 0
        if name != CONTROL:
            gap = [s - c for s, c in zip(result.per_seed_loss[name], result.per_seed_loss[CONTROL])]
            assert row["gap"]["mean_diff"] == pytest.approx(sum(gap) / SEEDS)
        if name not in ("none", CONTROL):
            c = row["vs_none"]
            diffs = [s - n for s, n in zip(result.per_seed_loss[name], result.per_seed_loss["none"])]
            assert c["seeds"] == SEEDS and c["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
            assert c["significant"] == (c["p_value"] < 0.05) and c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
