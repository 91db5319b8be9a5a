"""Paired statistics for comparing two runs on the same items (scipy).  Every comparison carries
its n, effect size and p-value; below ``MIN_N`` items it is labelled underpowered and is never
called significant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

MIN_N = 30


def cohens_d_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Cohen's d of paired samples: mean(b - a) / sd(b - a) (0 when every difference is 0)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    sd = diff.std(ddof=1) if len(diff) > 1 else 0.0
    return 0.0 if sd == 0 else float(diff.mean() / sd)


def bootstrap_ci(
    values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (seeded, so reports reproduce)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()), float(x.mean())) if len(x) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_t_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value (1.0 when the differences are all equal)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(diff) < 2 or np.all(diff == diff[0]):
        return 1.0 if len(diff) < 2 or diff[0] == 0 else 0.0
    return float(stats.ttest_rel(b, a).pvalue)


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (1.0 when every difference is 0)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(diff) == 0 or np.all(diff == 0):
        return 1.0
    return float(stats.wilcoxon(diff).pvalue)


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact McNemar test on paired correctness: binomial test of the discordant pairs."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """``b`` against ``a`` on the same n items (e.g. quantized vs reference per-item loss)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # paired t-test (McNemar for correctness)
    p_wilcoxon: float
    cohens_d: float
    underpowered: bool
    significant: bool
    mde: float = math.nan  # the smallest true difference the test detects with 80 % power

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def verdict(self) -> str:
        power = f"MDE {self.mde:.4g} at 80 % power"
        if self.underpowered:
            return f"underpowered (n < {MIN_N}; {power})"
        return "significant" if self.significant else f"not significant ({power})"


def compare_paired(
    a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05, binary: bool = False
) -> PairedComparison:
    """``b`` against ``a`` item by item; ``p_value`` is the paired t-test's, or McNemar's exact
    test when ``binary`` (per-item correctness, 0/1)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items on both sides: {len(a)} vs {len(b)}")
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a_)
    lo, hi = bootstrap_ci(b_ - a_)
    p = mcnemar_p(a_ > 0.5, b_ > 0.5) if binary else paired_t_p(a_, b_)
    underpowered = n < MIN_N
    sd = float((b_ - a_).std(ddof=1)) if n > 1 else math.nan
    return PairedComparison(
        n=n,
        mean_a=float(a_.mean()),
        mean_b=float(b_.mean()),
        mean_diff=float((b_ - a_).mean()),
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        p_wilcoxon=wilcoxon_p(a_, b_),
        cohens_d=cohens_d_paired(a_, b_),
        underpowered=underpowered,
        significant=(p < alpha) and not underpowered,
        mde=(mcnemar_mde(a_ > 0.5, b_ > 0.5, alpha=alpha) if binary else paired_mde(sd, n, alpha=alpha))
        if n > 1
        else math.inf,
    )


def mcnemar_mde(a_correct: Sequence[bool], b_correct: Sequence[bool], *, alpha: float = 0.05) -> float:
    """The minimal detectable difference in accuracy of the two-sided exact McNemar test on n
    items: the larger of the normal approximation at 80 % power, ``(z_{1-alpha/2} + z_0.8) ·
    sqrt(p_disc - d²) / sqrt(n)`` with the observed discordant share and difference (Connor 1987),
    and the smallest difference that can be significant at all, ``k / n`` with k the fewest
    one-way discordant pairs whose exact p, ``2 · 0.5**k``, is below ``alpha``."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    n = len(a)
    k = math.ceil(math.log2(2 / alpha))  # 2 · 0.5**k < alpha
    k += 2 * 0.5**k >= alpha
    disc, d = float((a != b).mean()), float(b.mean() - a.mean())
    approx = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(0.8)) * math.sqrt(max(disc - d * d, 0.0)) / math.sqrt(n)
    return max(k / n if k <= n else math.inf, float(approx))


@dataclass(frozen=True)
class SeedComparison:
    """``b`` against ``a`` with the training run as the unit: one value per seed on each side,
    paired by seed (same data order, same initial noise stream)."""

    seeds: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired t-test over seeds
    cohens_d: float  # d_z = mean / sd of the per-seed differences
    significant: bool
    mde: float = math.nan  # the smallest true difference the test detects with 80 % power (items fixed)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return "significant" if self.significant else "n.s."


def compare_seeds(
    a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05, confidence: float = 0.95
) -> SeedComparison:
    """Per-seed values of two strategies, paired by seed: mean difference ``b - a``, its t CI over
    seeds (``mean ± t_{(1+c)/2, S-1} · sd / sqrt(S)``), paired t-test p and d_z.  However many items
    each run was evaluated on, the seeds are the replicates: three seeds give 2 degrees of freedom."""
    if len(a) != len(b):
        raise ValueError(f"seed comparison needs the same seeds on both sides: {len(a)} vs {len(b)}")
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    s = len(diff)
    sd = float(diff.std(ddof=1)) if s > 1 else math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, s - 1) * sd / math.sqrt(s)) if s > 1 and sd > 0 else 0.0
    p = paired_t_p(a, b) if s > 1 else 1.0
    mde = paired_mde(sd, s, alpha=alpha) if s > 1 else math.inf
    return SeedComparison(
        seeds=s,
        mean_diff=float(diff.mean()),
        ci_low=float(diff.mean()) - half,
        ci_high=float(diff.mean()) + half,
        p_value=p,
        cohens_d=cohens_d_paired(a, b),
        significant=s > 1 and p < alpha,
        mde=mde,
    )


def paired_mde(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.80) -> float:
    """The minimal detectable difference of a two-sided paired t-test on n pairs (items, or seeds)
    at ``alpha`` with ``power``: ``(t_{1-alpha/2, n-1} + t_{power, n-1}) · sd / sqrt(n)`` (the usual
    noncentral-t approximation; sd of the paired differences)."""
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def two_level_bootstrap_ci(
    a_runs: Sequence[Sequence[float]],
    b_runs: Sequence[Sequence[float]],
    weights: Sequence[float] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """CI of the mean difference ``b - a`` when both the runs (seeds, paired: run s of ``a`` with
    run s of ``b``) and the items (paired: the same items on both sides) are samples.  Each of
    ``n_resamples`` resamples draws S seeds and n items with replacement (the two-stage bootstrap,
    Davison & Hinkley 1997, §3.8) and takes the ``weights``-weighted mean over the drawn items
    (answer tokens, for a token-weighted loss) of the per-item differences, averaged over the drawn
    seeds.  The interval is ``mean ± t_{(1+c)/2, S-1} · se · sqrt(S / (S-1))`` with ``se`` the sd of
    the resampled means: a resampled mean of S values has (S-1)/S of the true variance, and with a
    handful of seeds percentile ends would be narrower than the seed-level t interval."""
    a, b = np.asarray(a_runs, dtype=float), np.asarray(b_runs, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(
            f"two-level bootstrap needs >= 2 runs x items on both sides, one shape: {a.shape} vs {b.shape}"
        )
    s, n = a.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    runs = rng.integers(0, s, size=(n_resamples, s))
    items = rng.integers(0, n, size=(n_resamples, n))
    diff = b - a  # runs x items
    wi = w[items][:, None, :]
    means = ((diff[runs[:, :, None], items[:, None, :]] * wi).sum(-1) / wi.sum(-1)).mean(-1)
    centre = float(((diff * w).sum(-1) / w.sum()).mean())
    half = float(stats.t.ppf((1 + confidence) / 2, s - 1)) * float(means.std(ddof=1)) * math.sqrt(s / (s - 1))
    return centre - half, centre + half
