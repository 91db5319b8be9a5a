"""Loss attribution, the primary evidence of which layers hurt: quantize one decoder
layer at a time and measure, per evaluation item, the change of the answer-token loss (Δloss)
and KL(ref ‖ quant) of the next-token distributions, with 95 % CIs over items.

Cost: the reference pass of each batch records every decoder layer's input (hidden states and
the other arguments); quantizing layer i then re-runs only layers i…N−1 and the LM head (at the
answer positions only) from the recorded input of layer i, since the unquantized prefix 0…i−1
is exactly the reference's.  Over N layers that is N(N+1)/2 layer passes and N head passes,
instead of N full passes; the reference itself is the recording pass (it keeps the stack's final
hidden states beside the inputs) and the every-layer row one quantized pass.  ``only`` restricts the one-layer
rows to some layers (the two-stage attribution, ``harness.srdd.sensitivity``) without changing
any row's numbers: the quantized weights are the ones cached by the every-layer pass.  Only
modules the injector selects (``targets``/``exclude``/``overrides``) are quantized; a layer with
none is left out.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harness.eval.loss import answer_batches
from harness.eval.stats import bootstrap_ci
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd.scan import record_layers

MIN_ITEMS = 32
# The negligible band δ of a one-layer Δloss, in nats per answer token: changes inside ±δ are
# read as no change.  0.005 is a third of an average layer's share of the MXFP4 loss gap of a
# 30-layer model (0.45 / 30) and below what 32 items resolve (a per-layer CI half-width is
# about 0.007 there); see docs/srdd.md.
NEGLIGIBLE_DELTA = 0.005


class Label(str, Enum):
    """What a Δloss CI says against the negligible band ±δ."""

    HARMFUL = "harmful"  # the whole CI lies above +δ
    BENEFICIAL = "beneficial"  # the whole CI lies below −δ: quantizing the layer lowers the loss
    NEGLIGIBLE = "negligible"  # the whole CI lies inside [−δ, +δ]
    INCONCLUSIVE = "inconclusive"  # the CI crosses a band edge


def label(ci: Sequence[float], delta: float = NEGLIGIBLE_DELTA) -> Label:
    """The :class:`Label` of a Δloss confidence interval ``(low, high)`` for the band ±``delta``
    (an equivalence reading of a CI: Schuirmann's two one-sided tests at the CI's level)."""
    lo, hi = ci
    if lo > delta:
        return Label.HARMFUL
    if hi < -delta:
        return Label.BENEFICIAL
    if lo >= -delta and hi <= delta:
        return Label.NEGLIGIBLE
    return Label.INCONCLUSIVE


def contradicts(a: Label, b: Label) -> bool:
    """Two labels of one layer from disjoint items contradict when one is decided (harmful or
    beneficial) and the other says the opposite or negligible; inconclusive contradicts nothing."""
    decided = {Label.HARMFUL, Label.BENEFICIAL}
    return a != b and (a in decided or b in decided) and Label.INCONCLUSIVE not in (a, b)


class PerItem:
    """Means and paired 95 % bootstrap CIs over items of ``delta_loss_items`` and ``kl_items``."""

    delta_loss_items: list[float]
    kl_items: list[float]

    @property
    def delta_loss(self) -> float:
        return float(np.mean(self.delta_loss_items))

    @property
    def kl(self) -> float:
        return float(np.mean(self.kl_items))

    @property
    def ci(self) -> tuple[float, float]:
        """Paired 95 % bootstrap CI of the mean per-item Δloss (quantized − reference)."""
        return bootstrap_ci(self.delta_loss_items)

    @property
    def kl_ci(self) -> tuple[float, float]:
        return bootstrap_ci(self.kl_items)


@dataclass
class Attribution(PerItem):
    """One layer (or ``all``) quantized alone: per-item Δloss and KL, their means and CIs."""

    layer: str
    delta_loss_items: list[float]
    kl_items: list[float]

    def label(self, delta: float = NEGLIGIBLE_DELTA) -> Label:
        return label(self.ci, delta)

    @property
    def harmful(self) -> bool:
        """Quantizing the layer raises the loss beyond the negligible band: its Δloss CI lies
        above +:data:`NEGLIGIBLE_DELTA`."""
        return self.label() is Label.HARMFUL


def selected_layers(model: nn.Module, injector: QuantInjector) -> list[str]:
    """The decoder layers holding at least one module the injector quantizes, in model order."""
    chosen = {w.layer for w, _ in injector.select()}
    return [name for name in ModelView(model).layer_names if name in chosen]


def _item_stats(ref: list[torch.Tensor], quant: list[torch.Tensor], targets: list[torch.Tensor]):
    """Per item: mean Δ NLL over its answer tokens and mean KL(ref ‖ quant)."""
    out = []
    for r, q, t in zip(ref, quant, targets):
        delta = (r.gather(-1, t[:, None]) - q.gather(-1, t[:, None])).mean().item()
        kl = F.kl_div(q, r, log_target=True, reduction="sum").item() / len(t)
        out.append((delta, kl))
    return out


@torch.no_grad()
def loss_attribution(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    only: Collection[str] | None = None,
    **select,
) -> list[Attribution]:
    """``[all layers, then each decoder layer alone]`` under ``fmt`` at ``point``; ``only``: just
    those decoder layers alone (each row's numbers are the same as in the run over all layers)."""
    view = ModelView(model)
    layers = view.layers
    injector = QuantInjector(model, fmt, point, seed=seed, **select)
    names = [name for name in selected_layers(model, injector) if only is None or name in only]
    rows = {name: Attribution(name, [], []) for name in ["all", *names]}
    device = next(model.parameters()).device
    with injector:
        for input_ids, mask, lengths in answer_batches(tokenizer, items, batch_size, device, progress):
            targets = [input_ids[i, start:length] for i, (length, start) in enumerate(lengths)]
            with injector.paused():
                record = record_layers(model, input_ids, mask)
                captured = record.inputs
                ref = view.head_logprobs(record.final, lengths)
            final = view.body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            _extend(rows["all"], _item_stats(ref, view.head_logprobs(final, lengths), targets))
            for name in tqdm(names, desc="attribution", unit="layer", disable=not progress):
                start = next(i for i, (n, _) in enumerate(layers) if n == name)
                with injector.restricted(lambda m, p=name + ".": m.startswith(p)):
                    h = captured[name].hidden
                    for n, layer in layers[start:]:
                        h = captured[n].run(layer, h)
                    quant = view.head_logprobs(view.finish(h), lengths)
                _extend(rows[name], _item_stats(ref, quant, targets))
    return list(rows.values())


def _extend(row: Attribution, stats) -> None:
    for d, k in stats:
        row.delta_loss_items.append(d)
        row.kl_items.append(k)


def ranked(rows: list[Attribution]) -> list[Attribution]:
    """Per-layer rows (not ``all``), largest KL first (KL has a lower variance than Δloss)."""
    return sorted((r for r in rows if r.layer != "all"), key=lambda r: -r.kl if math.isfinite(r.kl) else -math.inf)
