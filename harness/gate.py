"""Paired gates with three outcomes: ``regression``, ``pass`` or ``inconclusive``,
never two, so "passed" never hides "could not have failed".

A candidate run is judged against a baseline run on the same n items (per-item values):

- ``regression``: the one-sided test of a drop is significant at ``alpha`` (default 0.05), at any
  n.  Accuracy (0/1 per item): exact McNemar, i.e. the binomial tail P(X >= lost | lost + gained,
  1/2) of the discordant pairs (lost = right before, wrong now).  Continuous metrics: the one-sided
  paired t-test of the mean per-item change in the bad direction.
- ``pass``: the upper end of the two-sided (1 - 2·alpha) confidence interval of the drop (the
  one-sided 1 - alpha bound, as in a non-inferiority test at the same alpha) is at most the margin.
  Accuracy: Bonett & Price's adjusted Wald interval for paired proportions (2012, J. Educ. Behav.
  Stat. 37: one pseudo-count in each discordant cell, n + 2), which stays honest at 0 discordant
  pairs; continuous: the paired t interval.
- ``inconclusive``: neither; reported with n, the minimal detectable drop at 80 % power,
  ``MDE = (z_{1-alpha} + z_{0.8}) · sd_d / sqrt(n)`` with sd_d the per-item sd of the change
  (accuracy: sqrt(p_lost + p_gained - d²), adjusted as above; Connor 1987 for McNemar's test in
  its normal approximation), and roughly the items that would settle it: those for which the MDE
  falls below the observed drop (a regression) or below margin − drop (a pass), whichever is
  larger, ``n = ((z_{1-alpha} + z_{0.8}) · sd_d / max(drop, margin - drop))²``.
- ``not comparable``: different item counts, a metric missing on one side.

Default margins (``MARGINS``, by metric-name suffix): accuracy 3 points absolute.  An unchanged
model on the GPU nightly's 250 items passes it: with no flipped answer the upper bound of the drop
is 1.645 · sqrt((2/252)/252) = 0.9 points, and with 9 answers flipping each way (non-deterministic
kernels) 2.9 points (10 each way: inconclusive); one point (the old rule) could never be shown on
250 items.  Continuous metrics: 1 % of the baseline mean (0.5 % for ``bits_per_byte`` and
``loss``, the stored baselines' tolerance), in the metric's bad direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats
from tabulate import tabulate

ALPHA = 0.05
POWER = 0.80
PASS, REGRESSION, INCONCLUSIVE, NOT_COMPARABLE = "pass", "regression", "inconclusive", "not comparable"
EXIT_CODES = {PASS: 0, REGRESSION: 1, INCONCLUSIVE: 2, NOT_COMPARABLE: 2}
_SEVERITY = (PASS, INCONCLUSIVE, NOT_COMPARABLE, REGRESSION)


class GateError(ValueError):
    """Input the gate cannot judge (unreadable file, unknown metric); names the bad value."""


@dataclass(frozen=True)
class Margin:
    """The largest drop that still passes: ``abs`` in the metric's unit, or ``rel`` as a fraction
    of the baseline mean."""

    kind: str
    value: float

    def bound(self, baseline_mean: float) -> float:
        return self.value if self.kind == "abs" else self.value * abs(baseline_mean)


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is gated: which direction is bad, exact McNemar (0/1 per item) or paired t."""

    higher_is_better: bool
    binary: bool
    margin: Margin


# Keyed by metric name or its ``_``-separated suffix, after dropping lm-eval's ",filter" part.
MARGINS: dict[str, MetricSpec] = {
    "exact_match": MetricSpec(True, True, Margin("abs", 0.03)),
    "acc": MetricSpec(True, True, Margin("abs", 0.03)),
    "top1_agree": MetricSpec(True, False, Margin("abs", 0.01)),
    "loss": MetricSpec(False, False, Margin("rel", 0.005)),
    "bits_per_byte": MetricSpec(False, False, Margin("rel", 0.005)),
    "word_perplexity": MetricSpec(False, False, Margin("rel", 0.01)),
    "kl": MetricSpec(False, False, Margin("rel", 0.01)),
}


def metric_spec(metric: str) -> MetricSpec:
    """The spec of ``metric`` (``exact_match,strict-match`` -> ``exact_match``; ``strict_exact_match``
    -> its suffix ``exact_match``); GateError naming the known metrics otherwise."""
    name = metric.split(",")[0]
    for i in range(len(name)):
        if (i == 0 or name[i - 1] == "_") and name[i:] in MARGINS:
            return MARGINS[name[i:]]
    raise GateError(f"no gate for metric {metric!r}; known metrics (or name suffixes): {', '.join(MARGINS)}")


@dataclass(frozen=True)
class GateResult:
    """``diff`` = candidate − baseline mean and its (1 − 2·alpha) CI; ``p``: one-sided p of a drop."""

    metric: str
    outcome: str
    test: str
    n: int
    baseline: float
    candidate: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    alpha: float
    margin: float
    higher_is_better: bool
    mde: float
    items_needed: int

    @classmethod
    def not_comparable(cls, metric: str, reason: str, alpha: float) -> GateResult:
        return cls(metric, NOT_COMPARABLE, reason, 0, *(math.nan,) * 6, alpha, math.nan, True, math.nan, 0)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def line(self) -> str:
        """One line: the outcome, its reason and every number it rests on."""
        if self.outcome == NOT_COMPARABLE:
            return f"{self.metric}: not comparable: {self.test}"
        sign = "-" if self.higher_is_better else "+"
        level = f"{1 - 2 * self.alpha:.0%}"
        reason = {
            REGRESSION: f"the drop is significant (one-sided {self.test} p={self.p:.3g} < alpha {self.alpha:g})",
            PASS: f"the {level} CI excludes a drop larger than the margin {self.margin:.4g} (p={self.p:.3g})",
            INCONCLUSIVE: (
                f"no significant drop (p={self.p:.3g}) but the {level} CI does not exclude one of the margin "
                f"{self.margin:.4g}: the minimal detectable drop at {POWER:.0%} power is {self.mde:.4g} on "
                f"{self.n} items; ~{self.items_needed} items would settle it"
            ),
        }[self.outcome]
        return (
            f"{self.metric}: {self.outcome.upper()}: {reason}; n={self.n}, baseline {self.baseline:.4f}, "
            f"candidate {self.candidate:.4f}, diff {self.diff:+.4f} [{level} CI {self.ci_low:+.4f}, "
            f"{self.ci_high:+.4f}], margin {sign}{self.margin:.4g}, MDE {self.mde:.4g}"
        )


def _planning(sd: float, n: int, alpha: float, margin: float, drop: float) -> tuple[float, int]:
    """(MDE at POWER on n items, items that would settle the observed ``drop``): a true drop of
    ``drop`` is detected, or one of ``margin`` excluded, with POWER once
    ``(z_{1-alpha} + z_POWER) · sd / sqrt(n)`` is below ``max(drop, margin - drop)``."""
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(POWER)
    mde = z * sd / math.sqrt(n)
    gap = max(drop, margin - drop)
    needed = math.ceil((z * sd / gap) ** 2) if gap > 0 and math.isfinite(sd) else 0
    return mde, needed


def _mcnemar(a: np.ndarray, b: np.ndarray, alpha: float, higher_is_better: bool):
    """(diff, CI, one-sided exact McNemar p of a drop, adjusted per-item sd) for 0/1 values."""
    n = len(a)
    up, down = int((~a & b).sum()), int((a & ~b).sum())  # items that went 0 -> 1, 1 -> 0
    bad = down if higher_is_better else up
    p = float(stats.binom.sf(bad - 1, up + down, 0.5)) if up + down else 1.0
    p_up, p_down = (up + 1) / (n + 2), (down + 1) / (n + 2)  # Bonett & Price's adjustment
    d = p_up - p_down
    sd = math.sqrt(max(p_up + p_down - d * d, 0.0))
    half = stats.norm.ppf(1 - alpha) * sd / math.sqrt(n + 2)
    return (up - down) / n, (max(d - half, -1.0), min(d + half, 1.0)), p, sd


def _paired_t(a: np.ndarray, b: np.ndarray, alpha: float, higher_is_better: bool):
    """(diff, CI, one-sided paired t p of a drop, per-item sd) for continuous values."""
    d = b - a
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    worse = -mean if higher_is_better else mean
    if n < 2 or sd == 0 or math.isnan(sd):
        p = 0.0 if sd == 0 and worse > 0 else 1.0
        half = 0.0 if sd == 0 else math.inf
        return mean, (mean - half, mean + half), p, (0.0 if sd == 0 else math.inf)
    se = sd / math.sqrt(n)
    p = float(stats.t.sf(worse / se, n - 1))
    half = stats.t.ppf(1 - alpha, n - 1) * se
    return mean, (mean - half, mean + half), p, sd


def paired_gate(
    metric: str,
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    alpha: float = ALPHA,
    margin: float | None = None,
    spec: MetricSpec | None = None,
) -> GateResult:
    """Judge ``candidate`` against ``baseline`` (same items, same order).  ``margin`` in the
    metric's unit overrides the spec's default (``MARGINS``)."""
    spec = spec or metric_spec(metric)
    if not 0 < alpha < 0.5:
        raise GateError(f"alpha must be in (0, 0.5), got {alpha}")
    a, b = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    if len(a) != len(b) or len(a) == 0:
        reason = f"{len(a)} baseline items vs {len(b)} candidate items: a paired gate needs the same items"
        return GateResult.not_comparable(metric, reason, alpha)
    bound = spec.margin.bound(float(a.mean())) if margin is None else float(margin)
    if bound < 0:
        raise GateError(f"margin must be >= 0, got {bound}")
    if spec.binary:
        if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
            raise GateError(f"{metric}: McNemar's gate needs 0/1 per item, got other values")
        diff, (lo, hi), p, sd = _mcnemar(a > 0.5, b > 0.5, alpha, spec.higher_is_better)
        test = "exact McNemar"
    else:
        diff, (lo, hi), p, sd = _paired_t(a, b, alpha, spec.higher_is_better)
        test = "paired t-test"
    worst = -lo if spec.higher_is_better else hi  # the CI's largest drop
    outcome = REGRESSION if p < alpha else PASS if worst <= bound else INCONCLUSIVE
    mde, needed = _planning(sd, len(a), alpha, bound, -diff if spec.higher_is_better else diff)
    return GateResult(
        metric,
        outcome,
        test,
        len(a),
        float(a.mean()),
        float(b.mean()),
        diff,
        lo,
        hi,
        p,
        alpha,
        bound,
        spec.higher_is_better,
        mde,
        needed,
    )


def worst_outcome(results: Sequence[GateResult]) -> str:
    """regression > not comparable > inconclusive > pass (``pass`` for no results)."""
    return max((r.outcome for r in results), key=_SEVERITY.index, default=PASS)


def gate_table(
    baseline: dict[str, Sequence[float]], candidate: dict[str, Sequence[float]], *, alpha: float = ALPHA
) -> tuple[list[GateResult], str]:
    """Every metric of ``candidate`` gated against ``baseline``'s, and a table of them."""
    results = [
        paired_gate(m, baseline[m], v, alpha=alpha)
        if m in baseline
        else GateResult.not_comparable(m, "not in the baseline", alpha)
        for m, v in sorted(candidate.items())
    ]
    level = f"{1 - 2 * alpha:.0%} CI"
    rows = [
        [
            *(r.metric, r.n, r.baseline, r.candidate, f"{r.diff:+.4f}", f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"),
            *(f"{r.p:.3g}", f"{'-' if r.higher_is_better else '+'}{r.margin:.4g}", f"{r.mde:.4g}", r.outcome.upper()),
        ]
        for r in results
    ]
    headers = ["metric", "n", "baseline", "now", "diff", level, "p (drop)", "margin", "MDE 80%", ""]
    table = tabulate(rows, headers=headers, floatfmt=".4f")
    return results, table + "\n" + "\n".join(r.line() for r in results)


# Default metric of a document, in this order, when ``--metric`` is not given.
PREFERRED = ("exact_match,strict-match", "exact_match,flexible-extract", "bits_per_byte,none", "loss")


def read_per_item(path: str | Path) -> tuple[dict[str, list[float]], list | None]:
    """``(per-item values, item ids or None)`` from an ``eval gsm8k --output`` JSON
    (``result.per_item``, ids from its samples' ``doc_id``), an ``eval loss --json`` JSON or a
    minimal ``{"per_item": {metric: [values]}, "item_ids": [...]}`` document (ids optional)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GateError(f"{path}: not a readable JSON document ({err})") from err
    doc = doc if isinstance(doc, dict) else {}
    per_item = doc.get("per_item") or (doc.get("result") or {}).get("per_item")
    if not isinstance(per_item, dict) or not all(isinstance(v, list) for v in per_item.values()):
        raise GateError(
            f"{path}: no per-item values; expected `eval gsm8k --output`, `eval loss --json` or "
            '{"per_item": {"metric": [values]}}'
        )
    ids = doc.get("item_ids")
    if ids is None and doc.get("samples"):
        ids = sorted({s["doc_id"] for s in doc["samples"] if "doc_id" in s})
    return {k: [float(x) for x in v] for k, v in per_item.items()}, ids


def choose_metric(baseline: dict, candidate: dict, metric: str | None) -> str:
    """``metric`` if both documents have it, else the first of ``PREFERRED`` (or the only one) they share."""
    shared = [m for m in candidate if m in baseline]
    if metric is not None:
        if metric not in shared:
            raise GateError(f"metric {metric!r} is not in both documents; shared: {', '.join(shared) or 'none'}")
        return metric
    for m in (*PREFERRED, *(shared if len(shared) == 1 else ())):
        if m in shared:
            return m
    raise GateError(f"say which metric to gate with --metric; shared: {', '.join(shared) or 'none'}")


def gate_documents(
    baseline: str | Path,
    candidate: str | Path,
    *,
    metric: str | None = None,
    alpha: float = ALPHA,
    margin: float | None = None,
) -> GateResult:
    """:func:`paired_gate` of two per-item documents (:func:`read_per_item`) on :func:`choose_metric`;
    GateError (not comparable) when both name their items and the items differ."""
    (base, ids_a), (cand, ids_b) = read_per_item(baseline), read_per_item(candidate)
    if ids_a is not None and ids_b is not None and ids_a != ids_b:
        raise GateError(f"the documents hold different items ({len(ids_a)} vs {len(ids_b)} ids, not the same)")
    chosen = choose_metric(base, cand, metric)
    return paired_gate(chosen, base[chosen], cand[chosen], alpha=alpha, margin=margin)
