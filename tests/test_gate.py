"""The three-outcome paired gate (harness/gate.py) and `python -m harness gate`: cases the old
two-outcome gate (drop > 1 point and p < 0.05 with n >= 30) got wrong."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from harness.cli import main
from harness.gate import INCONCLUSIVE, PASS, REGRESSION, GateError, metric_spec, paired_gate


def planted_drop(n: int, right: int, lost: int) -> tuple[list[float], list[float]]:
    """Baseline: the first ``right`` of n items right; candidate: the first ``lost`` of them wrong."""
    baseline = [1.0] * right + [0.0] * (n - right)
    return baseline, [0.0] * lost + baseline[lost:]


def test_29_items_from_all_right_to_all_wrong_is_a_regression() -> None:
    """Old gate: n < 30, never significant, so it passed.  Exact McNemar: p = 0.5**29."""
    r = paired_gate("exact_match", *planted_drop(29, 29, 29))
    assert r.outcome == REGRESSION and r.p == pytest.approx(0.5**29) and r.diff == -1.0


def test_29_items_with_one_flip_is_inconclusive_with_the_items_that_would_settle_it() -> None:
    """p = 0.5 (one discordant pair); the 90 % Bonett-Price upper bound of the drop,
    (2 - 1)/31 + 1.645 · sqrt((3/31 - (1/31)²)/31) = 0.124, is far above the 3-point margin."""
    r = paired_gate("exact_match", *planted_drop(29, 29, 1))
    assert r.outcome == INCONCLUSIVE and r.p == 0.5
    assert -r.ci_low == pytest.approx(1 / 31 + 1.6449 * math.sqrt((3 / 31 - 1 / 31**2) / 31), rel=1e-3)
    assert r.mde > r.margin == 0.03 and r.items_needed > 29
    assert "INCONCLUSIVE" in r.line() and "n=29" in r.line() and "items would settle it" in r.line()


def test_a_planted_6_point_drop_on_250_items_is_a_regression() -> None:
    """15 of 250 answers lost, none gained: the old rule ("drop > 1 point and significant") also
    caught this, but so does any significant drop now, with p = 0.5**15."""
    r = paired_gate("exact_match,strict-match", *planted_drop(250, 175, 15))
    assert r.outcome == REGRESSION and r.diff == pytest.approx(-0.06) and r.p == pytest.approx(0.5**15)


def test_a_small_significant_drop_is_a_regression_even_below_the_old_1_point_rule() -> None:
    """At n = 2000, 14 lost answers (0.7 points) with none gained: p = 0.5**14 -> regression."""
    assert paired_gate("exact_match", *planted_drop(2000, 1500, 14)).outcome == REGRESSION


def test_identical_runs_pass_on_the_nightly_item_count_and_noise_flips_too() -> None:
    """250 items, no flip: upper bound 1.645 · sqrt((2/252)/252) = 0.92 points < 3. Nine answers
    flipping each way (a non-deterministic GPU) still pass (1.645 · sqrt((20/252)/252) = 2.9
    points); ten do not; on 29 items nothing can pass."""
    a, _ = planted_drop(250, 175, 0)
    r = paired_gate("exact_match", a, a)
    assert r.outcome == PASS and r.diff == 0 and r.ci_high == pytest.approx(1.6449 * math.sqrt(2 / 252 / 252), rel=1e-3)
    b = list(a)
    b[:9] = [0.0] * 9
    b[-9:] = [1.0] * 9
    assert paired_gate("exact_match", a, b).outcome == PASS
    b[9], b[-10] = 0.0, 1.0
    assert paired_gate("exact_match", a, b).outcome == INCONCLUSIVE
    assert paired_gate("exact_match", [1.0] * 29, [1.0] * 29).outcome == INCONCLUSIVE


def test_continuous_metrics_use_a_one_sided_paired_t_test_in_the_bad_direction() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1.5, 0.3, 32)
    worse = base + 0.03 + rng.normal(0, 0.01, 32)
    r = paired_gate("loss", base, worse)
    assert r.outcome == REGRESSION and r.p == pytest.approx(stats.ttest_rel(worse, base, alternative="greater").pvalue)
    assert paired_gate("loss", base, base - 0.03).outcome == PASS  # lower loss is better
    assert paired_gate("top1_agree", base, base - 0.03).outcome == REGRESSION  # higher agreement is better
    assert paired_gate("loss", base, base).outcome == PASS


def test_bad_input_names_the_value_and_the_choices() -> None:
    with pytest.raises(GateError, match=r"no gate for metric 'rouge'.*exact_match"):
        metric_spec("rouge")
    with pytest.raises(GateError, match="McNemar's gate needs 0/1"):
        paired_gate("exact_match", [0.5] * 4, [1.0] * 4)
    assert paired_gate("exact_match", [1.0] * 4, [1.0] * 5).outcome == "not comparable"


def _doc(path, per_item: dict, **extra) -> str:
    path.write_text(json.dumps({"per_item": per_item, **extra}))
    return str(path)


@pytest.mark.parametrize(
    "n, right, lost, code, word",
    [(29, 29, 29, 1, "REGRESSION"), (250, 175, 15, 1, "REGRESSION"), (29, 29, 1, 2, "INCONCLUSIVE")],
)
def test_gate_command_exit_codes(tmp_path, capsys, n: int, right: int, lost: int, code: int, word: str) -> None:
    a, b = planted_drop(n, right, lost)
    args = [
        _doc(tmp_path / "a.json", {"exact_match,strict-match": a}),
        _doc(tmp_path / "b.json", {"exact_match,strict-match": b}),
    ]
    assert main(["gate", *args]) == code
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and word in out[0] and "margin" in out[0]


def test_gate_command_on_eval_outputs_and_not_comparable_documents(tmp_path, capsys) -> None:
    same = {"result": {"per_item": {"exact_match,strict-match": [1.0] * 175 + [0.0] * 75}}}
    (tmp_path / "g.json").write_text(json.dumps(same))
    assert main(["gate", str(tmp_path / "g.json"), str(tmp_path / "g.json")]) == 0
    assert capsys.readouterr().out.startswith("exact_match,strict-match: PASS")
    loss = _doc(tmp_path / "l.json", {"loss": [1.0, 2.0, 3.0], "kl": [0.1, 0.2, 0.3]})
    assert main(["gate", loss, _doc(tmp_path / "l2.json", {"loss": [1.0, 2.0]})]) == 2
    assert "not comparable" in capsys.readouterr().out
    other = _doc(tmp_path / "o.json", {"loss": [1.0, 2.0, 3.0]}, item_ids=[4, 5, 6])
    assert main(["gate", _doc(tmp_path / "i.json", {"loss": [1.0, 2.0, 3.0]}, item_ids=[1, 2, 3]), other]) == 2
    assert "different items" in capsys.readouterr().out
    assert main(["gate", loss, loss, "--metric", "rouge"]) == 2
    assert "metric 'rouge' is not in both documents; shared: loss, kl" in capsys.readouterr().out
    assert main(["gate", loss, loss, "--metric", "kl", "--margin", "0"]) == 0
