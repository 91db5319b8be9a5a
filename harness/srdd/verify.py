"""Verification of a recommendation against a control of seeded random proposals of the same size.

The proposal (its layers kept in BF16, or the milder format everywhere) is evaluated on the same
items as the format as is, and so are ``draws`` seeded random proposals of the same size: the
same number of random layers in BF16, or, for a format change, a random half of the layers in the
milder format (a whole-model change has no same-size random twin; the half-model draws ask whether
the change is needed everywhere).  Recovery = (loss_fmt − loss_proposed) / (loss_fmt − loss_ref),
token-weighted; its 95 % CI and the CI of the proposal's per-item advantage over the control
(control loss − proposed loss, averaged over draws) are bootstrapped over items.  The proposal is
``confirmed`` only when its recovery is > 0 and the advantage CI lies above 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from harness.eval.loss import LossResult, answer_logprobs, evaluate_loss
from harness.eval.stats import bootstrap_ci
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.srdd.criteria import Recommendation

CONTROL_DRAWS = 5
BOOTSTRAP = 2000


@dataclass
class Verification:
    proposal: str
    items: int
    reference_loss: float
    format_loss: float
    proposed_loss: float
    format_kl: float
    proposed_kl: float
    recovery: float
    recovery_ci: list[float]
    control: str
    control_recovery: float
    control_recoveries: list[float]
    advantage: float
    advantage_ci: list[float]
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


def judge(rec_value: float, advantage_ci: tuple[float, float], control_recovery: float) -> tuple[bool, str]:
    """``confirmed`` and the sentence that says why (or why not)."""
    if not math.isfinite(rec_value) or rec_value <= 0:
        return False, f"not confirmed: the proposal recovers {rec_value:.1%} of the loss increase (≤ 0)"
    lo, hi = advantage_ci
    if not lo > 0:
        verdict, where = ("worse than", "lies below 0") if hi < 0 else ("no better than", "includes 0")
        return False, (
            f"not confirmed: {verdict} random proposals of the same size "
            f"(control recovery {control_recovery:.1%}; advantage CI [{lo:+.4f}, {hi:+.4f}] {where})"
        )
    return True, f"confirmed: beats random proposals of the same size (control recovery {control_recovery:.1%})"


def verify(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    rec: Recommendation,
    layers: list[str],
    *,
    draws: int = CONTROL_DRAWS,
    seed: int = 0,
    batch_size: int = 8,
) -> Verification | None:
    """Evaluate the proposal of ``rec`` and its control on ``items`` (module docstring)."""
    if rec.action == "no_action" or (rec.action == "reconsider_format" and rec.alternative_format is None):
        return None
    unquantized = answer_logprobs(model, tokenizer, items, batch_size=batch_size)

    def loss(overrides: dict[str, str | None]) -> LossResult:
        with QuantInjector(model, fmt, point, seed=seed, overrides=overrides) as inj:
            return evaluate_loss(model, tokenizer, items, inj, against=unquantized, batch_size=batch_size)

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
    as_is, proposed = loss({}), loss(chosen)
    control_runs = [loss(c) for c in controls]
    tokens = np.asarray(as_is.n_tokens, dtype=float)
    ref, fmt_nll, prop = (np.asarray(x, dtype=float) for x in (as_is.reference_nll, as_is.nll, proposed.nll))
    ctrl = np.mean([np.asarray(c.nll, dtype=float) for c in control_runs], axis=0)
    rec_value = recovery(ref, fmt_nll, prop, tokens)
    control_recoveries = [recovery(ref, fmt_nll, np.asarray(c.nll, dtype=float), tokens) for c in control_runs]
    advantage_items = (ctrl - prop) / tokens  # per-item mean NLL: control − proposal
    adv_ci = bootstrap_ci(advantage_items)
    control_recovery = float(np.mean(control_recoveries))
    confirmed, verdict = judge(rec_value, adv_ci, control_recovery)
    s_fmt, s_prop = as_is.summary(), proposed.summary()
    return Verification(
        proposal=proposal,
        items=as_is.n,
        reference_loss=s_fmt["reference_loss"],
        format_loss=s_fmt["loss"],
        proposed_loss=s_prop["loss"],
        format_kl=s_fmt["kl"],
        proposed_kl=s_prop["kl"],
        recovery=rec_value,
        recovery_ci=list(recovery_ci(ref, fmt_nll, prop, tokens, seed=seed)),
        control=control,
        control_recovery=control_recovery,
        control_recoveries=control_recoveries,
        advantage=float(advantage_items.mean()),
        advantage_ci=list(adv_ci),
        confirmed=confirmed,
        verdict=verdict,
    )
