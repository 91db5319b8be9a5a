"""Every "n.s." of an AQN comparison states its power and the unit of its CIs; the pre-flight's
verdict says it is about the mean over draws and prints the single-draw prediction interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from harness.aqn.preflight import Interval, verdict
from harness.aqn.report import aqn_markdown, read_comparison
from harness.eval.stats import compare_seeds, paired_mde, two_level_bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "reports" / "sample" / "aqn-smollm2-135m-mxfp4-qerl-nvfp4.json"


def test_the_sample_report_is_its_json_rendered_with_mdes_and_the_unit_of_every_ci() -> None:
    comparison, model, targeted, how = read_comparison(SAMPLE)
    text = aqn_markdown(comparison, model, targeted, how)
    assert SAMPLE.with_suffix(".md").read_text() == text  # regenerated, not hand-edited
    rows = [line for line in text.splitlines() if line.startswith("| ") and "±" in line and "Strategy" not in line]
    cells = [c for row in rows for c in row.split("|")[3:5] if c.strip() != "-"]
    assert len(cells) == 8 and all("MDE" in c and "seeds x items [" in c for c in cells)
    assert "over seeds" in text and "conditional on these 8 evaluation items (items fixed" in text
    assert "two-level bootstrap over seeds and items" in text


def test_the_sample_mdes_are_what_5_seeds_could_have_seen() -> None:
    """global / targeted / healthy against none: effects below 0.017 / 0.010 / 0.003 nats were
    out of reach of 5 seeds; the MDE is (t_0.975,4 + t_0.8,4) · sd / sqrt(5)."""
    losses = json.loads(SAMPLE.read_text())["per_seed_loss"]
    mdes = [compare_seeds(losses["none"], losses[s]).mde for s in ("global", "targeted", "healthy")]
    assert mdes == pytest.approx([0.0172, 0.0097, 0.0033], abs=1e-4)
    diff = np.subtract(losses["global"], losses["none"])
    expected = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * diff.std(ddof=1) / math.sqrt(5)
    assert paired_mde(float(diff.std(ddof=1)), 5) == pytest.approx(expected)


def test_the_two_level_bootstrap_adds_the_items_uncertainty() -> None:
    """No item-to-item spread: the two-level CI is the seed-level t CI (to bootstrap noise).  No
    seed-to-seed spread: the seed CI has zero width, the two-level one does not.  On the sample,
    the headline gap's CI over seeds [0.231, 0.263] is ~4x narrower than over seeds and items."""
    rng = np.random.default_rng(0)
    seeds = rng.normal(0.1, 0.02, 6)
    a, b = np.zeros((6, 10)), np.repeat(seeds[:, None], 10, axis=1)
    lo, hi = two_level_bootstrap_ci(a, b, n_resamples=20_000)
    t = compare_seeds(a.mean(1), b.mean(1))
    assert lo == pytest.approx(t.ci_low, abs=0.004) and hi == pytest.approx(t.ci_high, abs=0.004)
    items = rng.normal(0.1, 0.05, 10)
    lo, hi = two_level_bootstrap_ci(np.zeros((6, 10)), np.tile(items, (6, 1)))
    assert hi - lo > 0.02 and lo < items.mean() < hi
    doc = json.loads(SAMPLE.read_text())
    gap = next(r for r in doc["rows"] if r["strategy"] == "none")["gap"]
    assert gap["ci_two_level"][1] - gap["ci_two_level"][0] > 3 * (gap["ci_high"] - gap["ci_low"])
    with pytest.raises(ValueError, match="two-level bootstrap needs >= 2 runs"):
        two_level_bootstrap_ci([[1.0, 2.0]], [[1.0, 2.0]])


def test_the_preflight_prints_the_single_draw_prediction_interval() -> None:
    """Six draws of 1C-like loss increases: the mean's CI [2.4 %, 8.6 %] clears the 10 % risky
    line, one draw's 95 % prediction interval (mean ± t · sd · sqrt(1 + 1/6)) crosses it."""
    draws = [0.026, 0.104, 0.041, 0.078, 0.033, 0.048]
    i = Interval.over(draws)
    half = stats.t.ppf(0.975, 5) * np.std(draws, ddof=1) * math.sqrt(1 + 1 / 6)
    assert (i.draw_low, i.draw_high) == pytest.approx((np.mean(draws) - half, np.mean(draws) + half))
    top1 = Interval.over([0.95] * 5 + [0.96])
    assert verdict(i, top1) == "ok" and verdict(i.single_draw(), top1.single_draw()) == "borderline"


def test_the_preflight_command_says_which_the_verdict_is_about(tmp_path, capsys) -> None:
    from harness.cli import main

    lines = [
        json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) for i in (1, 2)
    ]
    for split in ("test", "train"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["aqn", "preflight", "--model", "tiny-llama", "--config", "1D", "--items", "2", "--draws", "3"]
    assert main([*argv, "--gsm8k-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(the mean over noise draws)" in out and "one draw (what one training step sees):" in out
    assert "95% prediction interval" in out
