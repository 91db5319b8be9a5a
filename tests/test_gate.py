"""The three-outcome paired gate (harness/gate.py): a regression is a drop shown to exceed
delta = margin / 2, Holm's correction over the metrics of a case and the cases of a run, exact
McNemar MDEs, and the operating characteristics measured by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.gate import (
    DELTA_FRACTION,
    INCONCLUSIVE,
    NOT_COMPARABLE,
    PASS,
    REGRESSION,
    GateError,
    GateReport,
    combine,
    gate_policy,
    holm,
    mcnemar_min_lost,
    paired_gate,
)


def planted_drop(n: int, right: int, lost: int) -> tuple[list[float], list[float]]:
    """Baseline: the first ``right`` of n items right; candidate: the first ``lost`` of them wrong."""
    baseline = [1.0] * right + [0.0] * (n - right)
    return baseline, [0.0] * lost + baseline[lost:]


def test_29_items_from_all_right_to_all_wrong_is_a_regression() -> None:
    r = paired_gate("exact_match", *planted_drop(29, 29, 29))
    assert r.outcome == REGRESSION and r.p < 1e-8 and r.diff == -1.0


def test_the_n29_mde_is_the_exact_mcnemar_one() -> None:
    """4 lost / 0 gained give exact McNemar p = 0.5**4 = 0.0625, never significant at 0.05; 5 lost
    (17.2 points) is the smallest drop that can be a regression on 29 items, so that is the MDE
    of an unchanged run (the normal approximation said 14 points, a drop no outcome could show)."""
    assert mcnemar_min_lost(29) == 5 and mcnemar_min_lost(29, 0.05, 0.015) == 5 and mcnemar_min_lost(4) is None
    assert paired_gate("exact_match", *planted_drop(29, 29, 5)).outcome == REGRESSION
    four = paired_gate("exact_match", *planted_drop(29, 29, 4))
    assert four.outcome == INCONCLUSIVE and four.p >= 0.0625
    same = paired_gate("exact_match", [1.0] * 29, [1.0] * 29)
    assert same.outcome == INCONCLUSIVE and same.mde == pytest.approx(5 / 29)
    assert paired_gate("exact_match", [1.0] * 3, [1.0] * 3).mde == math.inf  # 3 items can never show a drop


def test_29_items_with_one_flip_is_inconclusive_with_the_items_that_would_settle_it() -> None:
    """One discordant pair; the 95 % Bonett-Price upper bound of the drop,
    (2 - 1)/31 + 1.645 · sqrt((3/31 - (1/31)²)/31) = 0.124, is far above the 3-point margin."""
    r = paired_gate("exact_match", *planted_drop(29, 29, 1))
    assert r.outcome == INCONCLUSIVE and r.p >= 0.5
    assert r.drop_bounds[1] == pytest.approx(1 / 31 + 1.6449 * math.sqrt((3 / 31 - 1 / 31**2) / 31), rel=1e-3)
    assert r.mde > r.margin == 0.03 and r.items_needed > 29 and r.delta == 0.015
    assert "INCONCLUSIVE" in r.line() and "n=29" in r.line() and "items would settle it" in r.line()


def test_a_planted_6_point_drop_on_250_items_is_a_regression() -> None:
    """15 of 250 answers lost, none gained: the lower bound of the drop, 5.95 − 1.645 · 1.59 = 3.3
    points, is above delta (1.5 points)."""
    r = paired_gate("exact_match,strict-match", *planted_drop(250, 175, 15))
    assert r.outcome == REGRESSION and r.diff == pytest.approx(-0.06) and r.drop_bounds[0] > r.delta == 0.015


def test_a_significant_drop_well_inside_the_margin_is_not_a_regression() -> None:
    """At n = 2000, 14 lost answers (0.7 points) with none gained: exact McNemar p = 0.5**14, but
    the drop is below delta (1.5 points) and its upper bound, 1.0 point, inside the margin: pass."""
    r = paired_gate("exact_match", *planted_drop(2000, 1500, 14))
    assert r.outcome == PASS and r.drop_bounds[1] < 0.03


def test_identical_runs_pass_on_the_nightly_item_count_and_noise_flips_too() -> None:
    """250 items, no flip: upper bound 1.645 · sqrt((2/252)/252) = 0.92 points < 3. Nine answers
    flipping each way still pass (1.645 · sqrt((20/252)/252) = 2.9 points); ten do not."""
    a, _ = planted_drop(250, 175, 0)
    r = paired_gate("exact_match", a, a)
    assert r.outcome == PASS and r.diff == 0 and r.ci_high == pytest.approx(1.6449 * math.sqrt(2 / 252 / 252), rel=1e-3)
    b = list(a)
    b[:9] = [0.0] * 9
    b[-9:] = [1.0] * 9
    assert paired_gate("exact_match", a, b).outcome == PASS
    b[9], b[-10] = 0.0, 1.0
    assert paired_gate("exact_match", a, b).outcome == INCONCLUSIVE


@pytest.mark.parametrize("n", [32, 250, 1319])
@pytest.mark.parametrize("shift", [5e-4, 1e-4])
def test_a_systematic_loss_shift_far_inside_the_margin_with_tiny_noise_is_not_a_regression(
    n: int, shift: float
) -> None:
    """``a * (1 + 5e-4)`` plus noise of 1e-4 relative: significant at every n (p ~ 0), but 10x
    inside the 0.5 % margin, so the gate passes it."""
    rng = np.random.default_rng(n)
    a = rng.normal(1.5, 0.3, n)
    b = a * (1 + shift) + rng.normal(0, 1e-4 * 1.5, n)
    r = paired_gate("loss", a, b)
    assert stats.ttest_rel(b, a, alternative="greater").pvalue < 0.01  # significant: the old gate's regression
    assert r.outcome == PASS and r.delta == pytest.approx(DELTA_FRACTION * 0.005 * a.mean())


def test_differences_below_the_numerical_floor_are_zero() -> None:
    """An fp32-rounding-sized change (1e-8 relative) on every item is no change, even with margin 0."""
    a = np.linspace(1.0, 2.0, 64)
    r = paired_gate("loss", a, a * (1 + 1e-8), margin=0.0)
    assert r.outcome == PASS and r.diff == 0.0
    assert paired_gate("loss", a, a * (1 + 1e-3), margin=0.0).outcome == REGRESSION


def test_continuous_metrics_use_a_one_sided_paired_t_test_against_delta() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1.5, 0.3, 32)
    worse = base + 0.03 + rng.normal(0, 0.01, 32)
    r = paired_gate("loss", base, worse)
    expected = stats.ttest_1samp(worse - base, r.delta, alternative="greater").pvalue
    assert r.outcome == REGRESSION and r.p == pytest.approx(expected)
    assert paired_gate("loss", base, base - 0.03).outcome == PASS  # lower loss is better
    assert paired_gate("top1_agree", base, base - 0.03).outcome == REGRESSION  # higher agreement is better
    assert paired_gate("loss", base, base).outcome == PASS


def test_a_diverged_candidate_is_a_regression_and_a_diverged_baseline_not_comparable() -> None:
    a = [1.0, 1.2, 1.1, 1.3]
    for bad in (math.inf, -math.inf, math.nan):
        r = paired_gate("loss", a, [1.0, 1.2, bad, 1.3])
        assert r.outcome == REGRESSION and r.exit_code == 1 and "diverged: 1 of 4" in r.line()
        assert paired_gate("loss", [1.0, bad, 1.1, 1.3], a).outcome == NOT_COMPARABLE
    assert holm([paired_gate("loss", a, [math.inf] * 4), paired_gate("kl", a, a)])[0].outcome == REGRESSION


def test_bad_input_names_the_value_and_the_choices() -> None:
    with pytest.raises(GateError, match=r"no gate for metric 'rouge'.*exact_match"):
        gate_policy("rouge")
    with pytest.raises(GateError, match=r"no gate for metric 'weight_sqnr_db'"):  # stored, not gated
        gate_policy("weight_sqnr_db")
    with pytest.raises(GateError, match="McNemar's gate needs 0/1"):
        paired_gate("exact_match", [0.5] * 4, [1.0] * 4)
    with pytest.raises(GateError, match="margin must be a finite number >= 0"):
        paired_gate("loss", [1.0] * 4, [1.0] * 4, margin=-1)
    assert paired_gate("exact_match", [1.0] * 4, [1.0] * 5).outcome == NOT_COMPARABLE


def test_holm_adjusts_step_down_and_only_regressions() -> None:
    """p = (0.01, 0.04, 0.03) over 3 metrics: adjusted 3·0.01 = 0.03, max(0.03, 2·0.03) = 0.06,
    max(0.06, 0.04) = 0.06: only the first stays a regression at 0.05."""
    rng = np.random.default_rng(1)
    a = rng.normal(1.5, 0.3, 40)
    results = []
    for target in (0.01, 0.04, 0.03):  # a shift that gives one-sided p = target against delta
        r0 = paired_gate("loss", a, a + rng.normal(0, 0.01, 40))
        sd = r0.sd
        shift = r0.delta + stats.t.isf(target, 39) * sd / math.sqrt(40)
        noise = rng.normal(0, 0.01, 40)
        noise = (noise - noise.mean()) / noise.std(ddof=1) * sd
        results.append(paired_gate("loss", a, a + shift + noise))
    assert [r.p for r in results] == pytest.approx([0.01, 0.04, 0.03], rel=1e-6)
    assert all(r.outcome == REGRESSION for r in results)
    judged = holm(results)
    assert [r.p_adjusted for r in judged] == pytest.approx([0.03, 0.06, 0.06], rel=1e-6)
    assert [r.outcome == REGRESSION for r in judged] == [True, False, False] and judged[1].family == 3
    assert judged[1].mde > results[1].mde  # the MDE at alpha / 3


def _night(rng, metrics: int, n: int) -> list:
    """One nightly run of ``metrics`` loss-like metrics, no change, kernel noise far above delta."""
    out = []
    for _ in range(metrics):
        a = rng.normal(1.5, 0.3, n)
        out.append(paired_gate("loss", a, a + rng.normal(0, 0.2, n)))
    return out


def test_holm_keeps_a_nightly_run_of_12_metrics_from_failing_every_other_night() -> None:
    """Zero-mean noise with the MDE far above the margin (nothing can pass or fail on merit): each
    metric alone is a false regression ~4 % of the time, a night of 12 ~40 %; Holm over the
    night's metrics brings the night to <= alpha (measured: 300 nights)."""
    rng = np.random.default_rng(0)
    nights = [_night(rng, 12, 50) for _ in range(300)]
    alone = np.mean([any(r.outcome == REGRESSION for r in night) for night in nights])
    family = np.mean([GateReport.of(night).outcome == REGRESSION for night in nights])
    assert alone > 0.25 and family <= 0.06


def test_combine_applies_holm_across_the_cases_of_a_run() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(1.5, 0.3, 40)
    delta = paired_gate("loss", a, a).delta
    cases = [
        GateReport.of([paired_gate("loss", a, a + delta + 0.02 + rng.normal(0, 0.05, 40))], case=f"c{i}")
        for i in range(4)
    ]
    run = combine(cases)
    flat = holm([r for case in cases for r in case.results])
    assert [r.p_adjusted for r in run.results] == [r.p_adjusted for r in flat]
    assert all(r.family == 4 and r.p_adjusted >= case.results[0].p for r, case in zip(run.results, cases))
    assert [r.metric for r in run.results] == ["c0: loss", "c1: loss", "c2: loss", "c3: loss"]
    other = GateReport((), NOT_COMPARABLE, "different data sets", "c9")
    assert combine([GateReport.of([paired_gate("loss", a, a)]), other]).outcome == NOT_COMPARABLE
    assert "c9: different data sets" in combine([other]).lines()[0]


def _binary_run(rng, n: int, flips: float, drop: float) -> tuple[np.ndarray, np.ndarray]:
    """70 % right; ``flips`` of the items lose and as many gain an answer, plus ``drop`` more lost."""
    a = (rng.random(n) < 0.7).astype(float)
    u, b = rng.random(n), a.copy()
    b[(a == 1) & (u < (flips + drop) / 0.7)] = 0.0
    b[(a == 0) & (u < flips / 0.3)] = 1.0
    return a, b


def _loss_run(rng, n: int, noise: float, drop: float) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(1.5, 0.3, n)
    return a, a * (1 + drop) + rng.normal(0, noise, n)


# Per n: the per-item noise of the loss (sd of the change, chosen so the gate's MDE is 0.9 of the
# 0.5 % margin) and the accuracy margin the gate's own MDE at a drop of that margin stays below
# (2 % of the items flip each way): what each n can resolve.
OC_CONDITIONS = {100: (0.012, 0.27), 250: (0.019, 0.14), 1319: (0.044, 0.05)}


@pytest.mark.parametrize("n", sorted(OC_CONDITIONS))
def test_simulated_operating_characteristics(n: int) -> None:
    """200 simulated runs each: with no change at most 2 % are regressions; at a true drop of the
    margin at least 80 % are, wherever the margin is one the gate's MDE says n can resolve (the
    table above).  Loss: 0.5 % margin; accuracy: the margin of the table (3 points needs more
    than 1319 items at 2 % flips, docs/measurements/2026-12-02-gates.md)."""
    noise, acc_margin = OC_CONDITIONS[n]
    rng = np.random.default_rng(n)
    runs = 200
    for run, margin, drop in ((_loss_run, None, 0.005), (_binary_run, acc_margin, acc_margin)):
        metric = "loss" if margin is None else "exact_match"
        level = noise if margin is None else 0.02
        same = [paired_gate(metric, *run(rng, n, level, 0.0), margin=margin) for _ in range(runs)]
        worse = [paired_gate(metric, *run(rng, n, level, drop), margin=margin) for _ in range(runs)]
        false_alarms = np.mean([r.outcome == REGRESSION for r in same])
        power = np.mean([r.outcome == REGRESSION for r in worse])
        assert np.median([r.mde for r in worse]) <= worse[0].margin * 1.01, metric  # n resolves this margin
        assert false_alarms <= 0.02 and power >= 0.80, (metric, false_alarms, power)
        assert np.mean([r.outcome == PASS for r in same]) >= 0.8  # an unchanged model passes
