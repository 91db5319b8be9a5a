"""Verification of a recommendation on held-out items against chance, with the draw as the unit.

The proposal (its layers kept in BF16, or the milder format everywhere) is measured on GSM8K items
that did not choose it (the attribution's items choose, later test items verify), and so are
``draws`` seeded random proposals of the same size: the same number of random layers in BF16, or,
for a format change, a random half of the layers in the milder format (a whole-model change has no
same-size random twin; the half-model draws ask whether the change is needed everywhere).
Recovery = (loss_fmt − loss_proposed) / (loss_fmt − loss_ref), token-weighted, with its 95 %
bootstrap CI over items beside it.  The question "does the rule pick better layers than chance"
has the draw as its unit, so the test is a Monte Carlo rank test (Davison & Hinkley 1997, §4.2):
``control_p = (1 + #draws whose recovery is at least the proposal's) / (draws + 1)``, exact under
the null that the proposal is one more random draw; the proposal is ``confirmed`` only when its
recovery is > 0 and ``control_p ≤ ALPHA``, which needs at least 19 draws.  The draws may be
measured on the first ``control_items`` held-out items only (cheaper); the rank statistic then
compares the proposal's recovery on those same items.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from harness.eval.loss import LossResult, answer_logprobs, evaluate_loss
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.srdd.criteria import Recommendation

CONTROL_DRAWS = 19  # the fewest draws with which control_p can reach 0.05
ALPHA = 0.05
BOOTSTRAP = 2000


@dataclass
class Verification:
    proposal: str
    items: int  # held-out items the proposal was measured on
    heldout_items: list[int]  # their indices in the GSM8K test split
    reference_loss: float
    format_loss: float
    proposed_loss: float
    format_kl: float
    proposed_kl: float
    recovery: float
    recovery_ci: list[float]
    predicted_recovery: float | None
    budget_bits: float | None
    bits_per_weight: float | None
    control: str
    control_items: int  # the first this many held-out items measured the draws
    control_recoveries: list[float]  # one per draw
    control_recovery: float  # their mean
    proposal_control_recovery: float  # the proposal's recovery on the control items: the rank statistic
    rank: int  # 1 + draws strictly better than the proposal
    control_p: float
    confirmed: bool
    verdict: str


def recovery(ref: np.ndarray, fmt: np.ndarray, proposed: np.ndarray, tokens: np.ndarray) -> float:
    """(loss_fmt − loss_proposed) / (loss_fmt − loss_ref) of token-weighted sums; NaN when the
    format costs nothing."""
    gap = (fmt - ref).sum() / tokens.sum()
    return float((fmt - proposed).sum() / tokens.sum() / gap) if gap > 0 else math.nan


def recovery_ci(ref, fmt, proposed, tokens, *, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over items of :func:`recovery` (arrays of per-item NLL sums)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tokens), size=(BOOTSTRAP, len(tokens)))
    values = [recovery(ref[i], fmt[i], proposed[i], tokens[i]) for i in idx]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def control_p(value: float, draws: Sequence[float]) -> float:
    """``(1 + #draws at least as good as value) / (len(draws) + 1)``; a NaN draw or value counts
    against the proposal."""
    better = sum(not (math.isfinite(d) and math.isfinite(value)) or d >= value for d in draws)
    return (1 + better) / (len(draws) + 1)


def judge(rec_value: float, value: float, draws: Sequence[float], alpha: float = ALPHA) -> tuple[float, bool, str]:
    """``(control_p, confirmed, the sentence that says why)`` for a proposal recovering
    ``rec_value`` on the held-out items and ``value`` on the control items, against ``draws``."""
    p = control_p(value, draws)
    rank = 1 + sum(math.isfinite(d) and d > value for d in draws)
    where = f"rank {rank} of {len(draws) + 1} among {len(draws)} random draws of the same size, control_p {p:.3f}"
    if not math.isfinite(rec_value) or rec_value <= 0:
        return p, False, f"not confirmed: the proposal recovers {rec_value:.1%} of the loss increase (≤ 0); {where}"
    if p > alpha:
        floor = 1 / (len(draws) + 1)
        extra = f" (the smallest possible with {len(draws)} draws is {floor:.3f})" if floor > alpha else ""
        return p, False, f"not confirmed: no better than chance ({where} > {alpha:g}{extra})"
    return p, True, f"confirmed: better than chance ({where} ≤ {alpha:g})"


def verify(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    rec: Recommendation,
    layers: list[str],
    *,
    heldout_items: Sequence[int] | None = None,
    draws: int = CONTROL_DRAWS,
    control_items: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    allow_partial: bool = False,
) -> Verification | None:
    """Measure the proposal of ``rec`` and ``draws`` random proposals on the held-out ``items``
    (module docstring); ``heldout_items``: their indices in the test split, for the report."""
    if not rec.bf16_layers and rec.action != "reconsider_format":
        return None
    if rec.action == "reconsider_format" and rec.alternative_format is None:
        return None
    m = len(items) if control_items is None else min(control_items, len(items))
    unquantized = answer_logprobs(model, tokenizer, items, batch_size=batch_size)

    def loss(overrides: dict[str, str | None], n: int) -> LossResult:
        with QuantInjector(model, fmt, point, seed=seed, overrides=overrides, allow_partial=allow_partial) as inj:
            return evaluate_loss(model, tokenizer, items[:n], inj, against=unquantized[:n], batch_size=batch_size)

    rng = random.Random(seed)
    if rec.action == "reconsider_format":
        alt = rec.alternative_format
        proposal, chosen = f"{alt} everywhere", {f"{layer}.*": alt for layer in layers}
        half = max(1, len(layers) // 2)
        control = f"{alt} in a random {half} of {len(layers)} layers ({draws} seeded draws)"
        controls = [{f"{layer}.*": alt for layer in rng.sample(layers, half)} for _ in range(draws)]
    else:
        k = len(rec.bf16_layers)
        proposal, chosen = f"{fmt} with {k} layers in BF16", {f"{layer}.*": None for layer in rec.bf16_layers}
        control = f"{fmt} with {k} random layers in BF16 ({draws} seeded draws)"
        controls = [{f"{layer}.*": None for layer in rng.sample(layers, k)} for _ in range(draws)]
    as_is, proposed = loss({}, len(items)), loss(chosen, len(items))
    tokens = np.asarray(as_is.n_tokens, dtype=float)
    ref, fmt_nll, prop = (np.asarray(x, dtype=float) for x in (as_is.reference_nll, as_is.nll, proposed.nll))
    rec_value = recovery(ref, fmt_nll, prop, tokens)
    on_control = recovery(ref[:m], fmt_nll[:m], prop[:m], tokens[:m])
    draws_rec = [recovery(ref[:m], fmt_nll[:m], np.asarray(loss(c, m).nll, dtype=float), tokens[:m]) for c in controls]
    p, confirmed, verdict = judge(rec_value, on_control, draws_rec)
    s_fmt, s_prop = as_is.summary(), proposed.summary()
    return Verification(
        proposal=proposal,
        items=as_is.n,
        heldout_items=list(heldout_items) if heldout_items is not None else list(range(len(items))),
        reference_loss=s_fmt["reference_loss"],
        format_loss=s_fmt["loss"],
        proposed_loss=s_prop["loss"],
        format_kl=s_fmt["kl"],
        proposed_kl=s_prop["kl"],
        recovery=rec_value,
        recovery_ci=list(recovery_ci(ref, fmt_nll, prop, tokens, seed=seed)),
        predicted_recovery=rec.predicted_recovery,
        budget_bits=rec.budget_bits,
        bits_per_weight=rec.bits_per_weight,
        control=control,
        control_items=m,
        control_recoveries=draws_rec,
        control_recovery=float(np.mean(draws_rec)) if draws_rec else math.nan,
        proposal_control_recovery=on_control,
        rank=1 + sum(math.isfinite(d) and d > on_control for d in draws_rec),
        control_p=p,
        confirmed=confirmed,
        verdict=verdict,
    )
