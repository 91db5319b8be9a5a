"""Paired gates with three outcomes: ``regression`` (a drop shown to matter), ``pass`` (one shown
to be within the margin) or ``inconclusive``, so "passed" never hides "could not have failed" and
a significant but irrelevant drop is no regression.

A candidate run is judged against a baseline run on the same n items (per-item values).  With
``margin`` the largest drop that passes (the metric policy's, :mod:`harness.policy`) and
``delta = DELTA_FRACTION · margin`` (half of it; never below the numerical floor below):

- ``regression``: the one-sided (1 - alpha) lower bound of the drop exceeds ``delta``, i.e. the
  test of H0 "drop <= delta" rejects at ``alpha`` (after Holm's correction when several metrics or
  cases are judged together).  A drop shown to be closer to the margin than to zero fails; a
  systematic shift well inside the margin (a kernel's rounding) does not, however many items.
  Continuous metrics: the one-sided paired t-test of the mean per-item change against ``delta``.
  Binary metrics (0/1 per item): both the exact McNemar test (the binomial tail
  P(X >= lost | lost + gained, 1/2) of the discordant pairs) and the test of the drop against
  ``delta`` on Bonett & Price's adjusted Wald interval for paired proportions (2012, J. Educ.
  Behav. Stat. 37: one pseudo-count in each discordant cell, n + 2) must reject; the p-value is
  the larger of the two (an intersection-union test).
- ``pass``: the one-sided (1 - alpha) upper bound of the drop (the upper end of the two-sided
  1 - 2·alpha CI, as in a non-inferiority test) is at most the margin.  No multiplicity correction
  is needed: every metric must pass for the case to pass (an intersection-union test).
- ``inconclusive``: neither; reported with n and the minimal detectable drop (MDE): the smallest
  true drop a regression is declared for with 80 % power, ``delta + (t_{1-a} + t_{0.8}) · sd / sqrt(n)``
  (sd: of the per-item change; a = alpha / m, Holm's first step over m metrics); for binary metrics
  never below the smallest drop that *can* be significant at n, ``k/n`` with k the fewest lost
  answers (none gained) that exact McNemar and the bound against ``delta`` call a regression (at
  n = 29 and alpha 0.05: 5, since 0.5**4 = 0.0625).
- ``not comparable``: different items, a metric missing on one side, a non-finite baseline value.

A non-finite candidate item where the baseline's is finite (a diverged run) is a ``regression``.
Per-item changes smaller than ``NUMERICAL_FLOOR`` relative to the larger of the two values are
zero: below fp32's resolution after summing over an item's tokens they are arithmetic, not signal.

Holm (1979, Scand. J. Statist. 6): the m p-values sorted, the i-th compared with alpha / (m - i + 1),
stopping at the first that fails; :func:`holm` over the metrics of one case, :func:`combine` over
the cases of a run summarised into one verdict.

Default margins (the metric policy): accuracy 3 points absolute (an unchanged model on the GPU
nightly's 250 items passes it: with no flipped answer the upper bound of the drop is
1.645 · sqrt((2/252)/252) = 0.9 points, with 9 answers flipping each way 2.9 points); loss and
bits per byte 0.5 % of the baseline mean, word perplexity and KL 1 %, top-1 agreement 0.01.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
from scipy import stats
from tabulate import tabulate

from harness.peritem import DocumentError, PerItemDocument, read_document
from harness.policy import MetricPolicy, gated_metrics, policy_for

ALPHA = 0.05
POWER = 0.80
DELTA_FRACTION = 0.5  # a regression is a drop shown to exceed this fraction of the margin
NUMERICAL_FLOOR = 1e-6  # relative per-item change treated as zero


class Outcome(str, Enum):
    PASS = "pass"
    REGRESSION = "regression"
    INCONCLUSIVE = "inconclusive"
    NOT_COMPARABLE = "not comparable"
    UNREADABLE = "unreadable"

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> int:
        """The gate's contract: 0 pass, 1 a measured regression, 2 everything else."""
        return {Outcome.PASS: 0, Outcome.REGRESSION: 1}.get(self, 2)


PASS, REGRESSION, INCONCLUSIVE = Outcome.PASS, Outcome.REGRESSION, Outcome.INCONCLUSIVE
NOT_COMPARABLE, UNREADABLE = Outcome.NOT_COMPARABLE, Outcome.UNREADABLE
_SEVERITY = (PASS, INCONCLUSIVE, UNREADABLE, NOT_COMPARABLE, REGRESSION)


class GateError(ValueError):
    """Input the gate cannot judge (unknown metric, bad alpha or margin); names the bad value."""


def gate_policy(metric: str) -> MetricPolicy:
    """The policy of a gated metric (``exact_match,strict-match`` -> ``exact_match``); GateError
    naming the gated metrics otherwise."""
    policy = policy_for(metric)
    if policy is None or policy.margin is None:
        raise GateError(
            f"no gate for metric {metric!r}; gated metrics (or name suffixes): {', '.join(gated_metrics())}"
        )
    return policy


@dataclass(frozen=True)
class GateResult:
    """``diff`` = candidate − baseline mean and its two-sided (1 − 2·alpha) CI; ``p``: one-sided p
    of "the drop exceeds ``delta``", ``p_adjusted`` after Holm over ``family`` results; ``sd``:
    of the per-item change (binary: Bonett-Price adjusted); ``note``: why, where the numbers do
    not say it (a diverged candidate, what is not comparable)."""

    metric: str
    outcome: Outcome
    test: str
    n: int
    baseline: float
    candidate: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_adjusted: float
    alpha: float
    margin: float
    delta: float
    higher_is_better: bool
    binary: bool
    sd: float
    mde: float
    items_needed: int
    family: int = 1
    note: str = ""

    @classmethod
    def not_comparable(cls, metric: str, reason: str, alpha: float = ALPHA) -> GateResult:
        nan = math.nan
        return cls(metric, NOT_COMPARABLE, "", 0, *(nan,) * 7, alpha, nan, nan, True, False, nan, nan, 0, 1, reason)

    def as_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome.value}

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    @property
    def drop_bounds(self) -> tuple[float, float]:
        """The one-sided (1 - alpha) lower and upper bounds of the drop (bad-direction change)."""
        return (-self.ci_high, -self.ci_low) if self.higher_is_better else (self.ci_low, self.ci_high)

    def line(self) -> str:
        """One line: the outcome, its reason and every number it rests on."""
        if self.outcome == NOT_COMPARABLE:
            return f"{self.metric}: not comparable: {self.note}"
        low, high = self.drop_bounds
        level = f"{1 - self.alpha:.0%}"
        holm = f", Holm-adjusted over {self.family}: {self.p_adjusted:.3g}" if self.family > 1 else ""
        if self.note:
            reason = self.note
        elif self.outcome == REGRESSION:
            reason = (
                f"the drop exceeds delta {self.delta:.4g} (its {level} lower bound is {low:.4g}; "
                f"{self.test} p={self.p:.3g}{holm} < alpha {self.alpha:g})"
            )
        elif self.outcome == PASS:
            reason = f"the drop's {level} upper bound {high:.4g} is within the margin {self.margin:.4g}"
        else:
            reason = (
                f"no drop beyond delta {self.delta:.4g} shown (p={self.p:.3g}{holm}) and none of the margin "
                f"{self.margin:.4g} ruled out (the drop's {level} upper bound is {high:.4g}): the minimal "
                f"detectable drop at {POWER:.0%} power is {self.mde:.4g} on {self.n} items; "
                f"~{self.items_needed} items would settle it"
            )
        sign = "-" if self.higher_is_better else "+"
        return (
            f"{self.metric}: {self.outcome.value.upper()}: {reason}; n={self.n}, baseline {self.baseline:.4f}, "
            f"candidate {self.candidate:.4f}, diff {self.diff:+.4f} [{1 - 2 * self.alpha:.0%} CI {self.ci_low:+.4f}, "
            f"{self.ci_high:+.4f}], margin {sign}{self.margin:.4g}, delta {self.delta:.4g}, MDE {self.mde:.4g}"
        )


def _z(alpha: float, n: int | None = None) -> float:
    """The one-sided 1 - alpha quantile plus the POWER quantile: Student's t on n - 1 degrees of
    freedom when ``n`` is given, else normal."""
    if n is None:
        return float(stats.norm.ppf(1 - alpha) + stats.norm.ppf(POWER))
    return float(stats.t.ppf(1 - alpha, n - 1) + stats.t.ppf(POWER, n - 1))


def _bonett_price(lost: int, gained: int, n: int) -> tuple[float, float]:
    """(adjusted drop, its standard error): one pseudo-count in each discordant cell, n + 2."""
    p_lost, p_gained = (lost + 1) / (n + 2), (gained + 1) / (n + 2)
    drop = p_lost - p_gained
    return drop, math.sqrt(max(p_lost + p_gained - drop * drop, 0.0)) / math.sqrt(n + 2)


def _mcnemar_p(lost: int, gained: int, delta: float, n: int) -> float:
    """One-sided p of "drop > delta" for 0/1 items: the larger of exact McNemar's binomial tail
    and the Bonett-Price bound's normal tail against ``delta``."""
    exact = float(stats.binom.sf(lost - 1, lost + gained, 0.5)) if lost + gained else 1.0
    drop, se = _bonett_price(lost, gained, n)
    return max(exact, float(stats.norm.sf((drop - delta) / se)))


@functools.lru_cache(maxsize=256)
def mcnemar_min_lost(n: int, alpha: float = ALPHA, delta: float = 0.0) -> int | None:
    """The fewest lost answers (none gained) that :func:`paired_gate` calls a regression on n 0/1
    items at ``alpha`` (exact McNemar and the bound against ``delta``); None if no count can."""
    lost = np.arange(1, n + 1)
    p_lost, p_gained = (lost + 1) / (n + 2), 1 / (n + 2)
    drop = p_lost - p_gained
    se = np.sqrt(np.maximum(p_lost + p_gained - drop * drop, 0.0)) / math.sqrt(n + 2)
    p = np.maximum(0.5**lost, stats.norm.sf((drop - delta) / se))
    hits = np.flatnonzero(p < alpha)
    return int(lost[hits[0]]) if len(hits) else None


def _mde(binary: bool, sd: float, n: int, delta: float, level: float) -> float:
    """The smallest true drop declared a regression with POWER at one-sided ``level`` on n items."""
    if binary:
        fewest = mcnemar_min_lost(n, level, delta)
        exact = fewest / n if fewest is not None else math.inf
        return max(exact, delta + _z(level) * sd / math.sqrt(n + 2))
    if n < 2 or not math.isfinite(sd):
        return math.inf
    return delta + _z(level, n) * sd / math.sqrt(n)


def _items_needed(r: GateResult, level: float) -> int:
    """Roughly the items at which the observed drop would be settled with POWER: shown above
    ``delta`` or below the margin, whichever is nearer."""
    drop = -r.diff if r.higher_is_better else r.diff
    gap = max(drop - r.delta, r.margin - drop)
    if not (gap > 0 and math.isfinite(r.sd)):
        return 0
    return math.ceil((_z(level) * r.sd / gap) ** 2)


def _decide(r: GateResult, p_adjusted: float, family: int) -> GateResult:
    """``r`` judged with ``p_adjusted`` in a family of ``family`` results (MDE at alpha / family)."""
    if r.outcome == NOT_COMPARABLE:
        return r
    level = r.alpha / family
    if r.test == "non-finite":  # diverged: a regression whatever the family
        outcome = REGRESSION
    elif p_adjusted < r.alpha:
        outcome = REGRESSION
    else:
        outcome = PASS if r.drop_bounds[1] <= r.margin else INCONCLUSIVE
    return replace(
        r,
        outcome=outcome,
        p_adjusted=p_adjusted,
        family=family,
        mde=_mde(r.binary, r.sd, r.n, r.delta, level),
        items_needed=_items_needed(r, level),
    )


def paired_gate(
    metric: str,
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    alpha: float = ALPHA,
    margin: float | None = None,
    policy: MetricPolicy | None = None,
) -> GateResult:
    """Judge ``candidate`` against ``baseline`` (same items, same order), alone (family of one;
    :func:`holm` for several).  ``margin`` in the metric's unit overrides the policy's."""
    policy = policy or gate_policy(metric)
    if not 0 < alpha < 0.5:
        raise GateError(f"alpha must be in (0, 0.5), got {alpha}")
    a, b = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    if len(a) != len(b) or len(a) == 0:
        reason = f"{len(a)} baseline items vs {len(b)} candidate items: a paired gate needs the same items"
        return GateResult.not_comparable(metric, reason, alpha)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        return GateResult.not_comparable(metric, f"the baseline has {bad} non-finite item values", alpha)
    bound = policy.margin.bound(float(a.mean())) if margin is None else float(margin)
    if not bound >= 0 or not math.isfinite(bound):
        raise GateError(f"margin must be a finite number >= 0, got {bound}")
    up = 1.0 if policy.higher_is_better else -1.0  # drop = up * (baseline - candidate)
    diverged = ~np.isfinite(b)
    if diverged.any():
        worst = -math.inf if policy.higher_is_better else math.inf
        note = f"the candidate diverged: {int(diverged.sum())} of {len(b)} item values are non-finite"
        return replace(
            GateResult.not_comparable(metric, f"{note} where the baseline's are finite", alpha),
            **dict(outcome=REGRESSION, test="non-finite", n=len(a), baseline=float(a.mean())),
            **dict(candidate=float(b.mean()), diff=worst, ci_low=worst, ci_high=worst, p=0.0, p_adjusted=0.0),
            **dict(margin=bound, delta=DELTA_FRACTION * bound, higher_is_better=policy.higher_is_better),
            binary=policy.binary,
        )
    if policy.binary:
        if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
            raise GateError(f"{metric}: McNemar's gate needs 0/1 per item, got other values")
        delta = DELTA_FRACTION * bound
        gained, lost = int(((a < 0.5) & (b > 0.5)).sum()), int(((a > 0.5) & (b < 0.5)).sum())
        if not policy.higher_is_better:
            gained, lost = lost, gained
        n = len(a)
        drop, se = _bonett_price(lost, gained, n)
        half = float(stats.norm.ppf(1 - alpha)) * se
        low, high = max(drop - half, -1.0), min(drop + half, 1.0)
        p, sd, test = _mcnemar_p(lost, gained, delta, n), se * math.sqrt(n + 2), "exact McNemar & Bonett-Price"
    else:
        delta = max(DELTA_FRACTION * bound, NUMERICAL_FLOOR * abs(float(a.mean())))
        d = up * (a - b)  # per-item drop
        d[np.abs(a - b) <= NUMERICAL_FLOOR * np.maximum(np.abs(a), np.abs(b))] = 0.0
        n, drop = len(d), float(d.mean())
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        test = "paired t-test"
        if n > 1 and sd == 0:
            low = high = drop
            p = 0.0 if drop > delta else 1.0
        elif n > 1:
            se = sd / math.sqrt(n)
            p = float(stats.t.sf((drop - delta) / se, n - 1))
            half = float(stats.t.ppf(1 - alpha, n - 1)) * se
            low, high = drop - half, drop + half
        else:
            low, high, p = -math.inf, math.inf, 1.0
    diff = -up * drop if not policy.binary else -up * (lost - gained) / n
    ci = (-up * high, -up * low) if up > 0 else (-up * low, -up * high)
    r = GateResult(
        metric, INCONCLUSIVE, test, len(a), float(a.mean()), float(b.mean()), diff, *ci, p, p, alpha, bound,
        delta, policy.higher_is_better, policy.binary, sd, math.nan, 0,
    )  # fmt: skip
    return _decide(r, p, 1)


def holm(results: Sequence[GateResult]) -> list[GateResult]:
    """``results`` (in their order) judged as one family: Holm's step-down adjusted p-values
    ``p_(i) -> max_{j <= i} min(1, (m - j + 1) · p_(j))`` over the m comparable results."""
    judged = [i for i, r in enumerate(results) if r.outcome != NOT_COMPARABLE]
    m = len(judged)
    out = list(results)
    running = 0.0
    for rank, i in enumerate(sorted(judged, key=lambda i: results[i].p)):
        running = max(running, min(1.0, (m - rank) * results[i].p))
        out[i] = _decide(results[i], running, m)
    return out


def worst_outcome(results: Sequence[GateResult]) -> Outcome:
    """regression > not comparable > unreadable > inconclusive > pass (``pass`` for no results)."""
    return max((r.outcome for r in results), key=_SEVERITY.index, default=PASS)


@dataclass(frozen=True)
class GateReport:
    """The verdict on one case (or, :func:`combine`, a run of cases): every metric's result after
    Holm, and the outcome; ``problem``: why there are no results (unreadable, not comparable)."""

    results: tuple[GateResult, ...]
    outcome: Outcome
    problem: str = ""
    case: str = ""

    @classmethod
    def of(cls, results: Sequence[GateResult], case: str = "") -> GateReport:
        judged = tuple(holm(results))
        return cls(judged, worst_outcome(judged), case=case)

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def lines(self) -> list[str]:
        prefix = f"{self.case}: " if self.case else ""
        if self.problem:
            return [f"{prefix}{self.outcome.value}: {self.problem}"]
        return [prefix + r.line() for r in self.results]

    def table(self) -> str:
        """A table of the results, then one line each."""
        level = f"{1 - 2 * (self.results[0].alpha if self.results else ALPHA):.0%} CI"
        rows = [
            [
                *(r.metric, r.n, r.baseline, r.candidate, f"{r.diff:+.4f}", f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"),
                *(f"{r.p_adjusted:.3g}", f"{'-' if r.higher_is_better else '+'}{r.margin:.4g}", f"{r.delta:.4g}"),
                *(f"{r.mde:.4g}", r.outcome.value.upper()),
            ]
            for r in self.results
        ]
        headers = ["metric", "n", "baseline", "now", "diff", level, "p (Holm)", "margin", "delta", "MDE 80%", ""]
        return tabulate(rows, headers=headers, floatfmt=".4f") + "\n" + "\n".join(self.lines())


def combine(reports: Sequence[GateReport]) -> GateReport:
    """One verdict for a run of cases: Holm over every metric of every case (their unadjusted p),
    the worst outcome of all; a case without results (unreadable, not comparable) counts as its outcome."""
    flat = [(rep.case, r) for rep in reports for r in rep.results]
    judged = holm([r for _, r in flat])
    results = tuple(
        replace(r, metric=f"{case}: {r.metric}" if case else r.metric) for (case, _), r in zip(flat, judged)
    )
    outcome = max([worst_outcome(results), *(rep.outcome for rep in reports if rep.problem)], key=_SEVERITY.index)
    problems = "; ".join(f"{rep.case or 'a case'}: {rep.problem}" for rep in reports if rep.problem)
    return GateReport(results, outcome, problems)


def gate_table(
    baseline: dict[str, Sequence[float]], candidate: dict[str, Sequence[float]], *, alpha: float = ALPHA
) -> tuple[list[GateResult], str]:
    """Every metric of ``candidate`` gated against ``baseline``'s as one family (Holm), and a table."""
    results = [
        paired_gate(m, baseline[m], v, alpha=alpha)
        if m in baseline
        else GateResult.not_comparable(m, "not in the baseline", alpha)
        for m, v in sorted(candidate.items())
    ]
    report = GateReport.of(results)
    return list(report.results), report.table()


# Default metric of a document, in this order, when none is named.
PREFERRED = ("exact_match,strict-match", "exact_match,flexible-extract", "bits_per_byte,none", "loss")


def choose_metrics(baseline: dict, candidate: dict, metrics: Sequence[str] | None) -> list[str]:
    """``metrics`` if both documents have them, else the first of ``PREFERRED`` (or the only
    metric) they share; GateError naming the shared metrics otherwise."""
    shared = [m for m in candidate if m in baseline]
    if metrics:
        missing = [m for m in metrics if m not in shared]
        if missing:
            raise GateError(f"metric {missing[0]!r} is not in both documents; shared: {', '.join(shared) or 'none'}")
        return list(metrics)
    for m in (*PREFERRED, *(shared if len(shared) == 1 else ())):
        if m in shared:
            return [m]
    raise GateError(f"say which metric to gate with --metric; shared: {', '.join(shared) or 'none'}")


def gate_documents(
    baseline: PerItemDocument,
    candidate: PerItemDocument,
    *,
    metrics: Sequence[str] | None = None,
    alpha: float = ALPHA,
    margin: float | None = None,
    case: str = "",
) -> GateReport:
    """The paired gate of two per-item documents on :func:`choose_metrics`, Holm over them;
    ``not comparable`` when they hold different items (data set identity or ids)."""
    if (why := baseline.same_items(candidate)) is not None:
        return GateReport((), NOT_COMPARABLE, why, case)
    base, cand = baseline.per_item, candidate.per_item
    chosen = choose_metrics(base, cand, metrics)
    return GateReport.of([paired_gate(m, base[m], cand[m], alpha=alpha, margin=margin) for m in chosen], case)


def gate_files(
    baseline: str | Path,
    candidate: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    alpha: float = ALPHA,
    margin: float | None = None,
) -> GateReport:
    """:func:`gate_documents` of two files (:func:`harness.peritem.read_document`); a file that
    cannot be read is an ``unreadable`` report naming it, a metric or setting the gate cannot
    judge a ``not comparable`` one."""
    try:
        docs = read_document(baseline, "baseline"), read_document(candidate, "candidate")
    except DocumentError as err:
        return GateReport((), UNREADABLE, str(err))
    try:
        return gate_documents(*docs, metrics=metrics, alpha=alpha, margin=margin)
    except GateError as err:
        return GateReport((), NOT_COMPARABLE, str(err))
