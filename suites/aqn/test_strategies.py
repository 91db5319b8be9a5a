"""The AQN strategy comparison on the model under test: every strategy trains for the same
steps and seeds, and no difference is called significant unless it is (slow: ~6 min here)."""

from __future__ import annotations

import math

import pytest

from harness.aqn.configs import CONFIGS
from harness.aqn.train import compare_strategies
from harness.data import load_gsm8k
from harness.srdd import scan

pytestmark = [pytest.mark.aqn, pytest.mark.mxfp4, pytest.mark.slow]


def test_strategy_comparison_table(lm, loss_items, pytestconfig, metrics) -> None:
    model, tok = lm
    layers = [name for name, _ in scan.decoder_layers(model)]
    problematic = layers[: math.ceil(0.3 * len(layers))]
    result = compare_strategies(
        model,
        tok,
        load_gsm8k("train", 64, pytestconfig.getoption("--gsm8k-dir")),
        loss_items,
        fmt="mxfp4",
        config=CONFIGS["qerl-nvfp4"],
        strategies=["none", "global", "targeted", "healthy"],
        seeds=[0, 1, 2],
        steps=10,
        layers=layers,
        problematic=problematic,
    )
    rows = {r["strategy"]: r for r in result.rows()}
    assert set(rows) == {"none", "global", "targeted", "healthy"}
    for name, row in rows.items():
        metrics.record(**{f"{name}_loss": row["mean"]})
        assert math.isfinite(row["mean"]) and row["std"] >= 0
        if name != "none":
            assert row["n_items"] == len(loss_items) >= 30
            assert row["vs_none_significant"] == (row["vs_none_p"] < 0.05)
