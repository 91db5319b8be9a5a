"""Paired statistics on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.eval.stats import MIN_N, bootstrap_ci, cohens_d_paired, compare_paired, mcnemar_p, paired_t_p, wilcoxon_p


def test_cohens_d_of_a_constant_shift_with_known_spread() -> None:
    a = np.zeros(4)
    b = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sample sd sqrt(5/3)
    assert cohens_d_paired(a, b) == pytest.approx(2.5 / math.sqrt(5 / 3))
    assert cohens_d_paired(a, a) == 0.0


def test_paired_t_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + 0.3 + rng.normal(scale=0.5, size=40)
    d = b - a
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert paired_t_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert paired_t_p(a, a) == 1.0


def test_mcnemar_is_the_exact_binomial_of_discordant_pairs() -> None:
    a = [True] * 10 + [False] * 2 + [True] * 20
    b = [False] * 10 + [True] * 2 + [True] * 20
    # 10 vs 2 discordant: two-sided exact p = 2 * P(X <= 2 | n=12, 1/2) = 2 * 79 / 4096
    assert mcnemar_p(a, b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_p(a, a) == 1.0


def test_wilcoxon_all_zero_differences() -> None:
    assert wilcoxon_p([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_bootstrap_ci_covers_the_mean_and_is_seeded() -> None:
    x = np.random.default_rng(1).normal(loc=2.0, size=200)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.5
    assert bootstrap_ci(x) == (lo, hi)


def test_underpowered_comparisons_are_never_significant() -> None:
    a = np.zeros(MIN_N - 1)
    b = np.linspace(1.0, 2.0, MIN_N - 1)
    small = compare_paired(a, b)
    assert small.underpowered and small.p_value < 1e-6 and not small.significant
    big = compare_paired(np.zeros(MIN_N), np.linspace(1.0, 2.0, MIN_N))
    assert not big.underpowered and big.significant and big.n == MIN_N


def test_unpaired_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="same items on both sides: 3 vs 2"):
        compare_paired([1, 2, 3], [1, 2])


def test_not_significant_states_what_it_could_have_detected() -> None:
    """Two-sided exact McNemar needs 6 one-way discordant pairs (2 · 0.5**6 = 0.031 < 0.05; five
    give 0.0625), so on 29 unchanged items the MDE is 6/29 = 20.7 points, whatever the normal
    approximation says; a continuous comparison's MDE is (t_0.975 + t_0.8) · sd / sqrt(n)."""
    same = compare_paired([1.0] * 29, [1.0] * 29, binary=True)
    assert same.mde == pytest.approx(6 / 29) and "MDE 0.2069 at 80 % power" in same.verdict
    assert mcnemar_p([True] * 5, [False] * 5) == pytest.approx(0.0625)
    rng = np.random.default_rng(3)
    a = rng.normal(size=50)
    b = a + rng.normal(scale=0.2, size=50)
    sd = float(np.std(b - a, ddof=1))
    expected = (stats.t.ppf(0.975, 49) + stats.t.ppf(0.8, 49)) * sd / math.sqrt(50)
    cmp = compare_paired(a, b)
    assert cmp.mde == pytest.approx(expected) and cmp.verdict == f"not significant (MDE {expected:.4g} at 80 % power)"
