"""Second-order sensitivity screen of every decoder layer at once (Fisher / Gauss–Newton, as in
HAWQ-v2, Dong et al. 2020, and the Fisher estimate of KL, Martens 2014 "New insights and
perspectives on the natural gradient method" §9), and the two-stage attribution built on it.

Per evaluation item and layer i, with h_{i−1} the reference input of layer i and
δ_i = L_i^Q(h_{i−1}) − L_i(h_{i−1}) the change of its output when only its modules are quantized
(computed locally: one layer pass per layer), the network linearised around the reference gives
for the answer positions t (next-token distribution p_t, answer token a_t):

- KL(ref ‖ quant) ≈ ½ δ_iᵀ G_i δ_i with G_i = Σ_t J_tᵀ F_t J_t (F_t the softmax Fisher, J_t the
  Jacobian of position t's logits w.r.t. h_i).  For random cotangents v_t at the logits, drawn
  independently per position with E[v_t v_tᵀ] = F_t (``fisher_sketch``; y_t ~ p_t with
  v_t = e_{y_t} − p_t, the Fisher identity, is another such draw, with heavier tails),
  g_i = Σ_t J_tᵀ v_t has E[g g ᵀ] = G_i (cross-position terms have zero mean), so
  KL ≈ ½ E[(g_i · δ_i)²], estimated by the mean over ``samples`` draws; one backward pass gives
  g_i for every layer at once;
- Δloss ≈ −(g_i^a · δ_i) + KL with g_i^a the gradient of the answer tokens' log-likelihood (first
  order, near zero and of random sign for quantization noise, plus the Gauss–Newton second-order
  term, which equals the KL estimate).

Both are divided by the item's answer tokens, as the exact attribution's per-token means.  Cost
per batch: one reference forward with gradients on the hidden states only (parameters frozen), one
quantized pass of each layer on its recorded input, and ``samples`` + 1 backward passes: on
SmolLM2 (30 layers) 3.8 full loss passes with 1 draw, 4.5-5.0 with 2, 6.7 with 4 (CPU-time
ratios, ``suites/bench/test_scan_speed.py``).  Agreement with the exact per-layer KL there (mxfp4
weights, 32 items): Spearman 0.79-0.83 with 1 draw, 0.90 with 2 (top-5 overlap 4/5), 0.92 with 4;
hence ``SAMPLES`` = 2.  The scan's default (``DEFAULT_MODE``) is the two-stage ``screen``: the
screen only picks which layers get exact rows, and every verdict rests on those.

The screen only ranks: the two-stage attribution (``screened_attribution``) runs the exact suffix
attribution (``harness.srdd.attribution.loss_attribution``) on the ``top_k`` screened layers and
every layer the detectors flagged, so each "harmful by attribution" verdict rests on exact
per-item Δloss with its CI; the other layers carry screen estimates, labelled as such.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harness.eval.loss import answer_batches
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd.attribution import (
    Attribution,
    PerItem,
    loss_attribution,
    ranked,
    selected_layers,
)
from harness.srdd.scan import record_layers

# screen: Fisher screen + exact rows for its top-k and the layers a detector points at; exact: every
# layer exactly; none: no attribution (no verdict from direct evidence; floor rules only)
ATTRIBUTION_MODES = ("screen", "exact", "none")
TOP_K = 5
SAMPLES = 2  # sketch draws per item: Spearman vs exact KL 0.79 with 1, 0.90 with 2 (SmolLM2)
DEFAULT_MODE = "screen"


@dataclass
class Screened(PerItem):
    """One layer's screen estimates per item: KL (Fisher quadratic form) and the first-order
    Δloss; ``delta_loss_items`` is the second-order Δloss estimate, the first-order term plus the
    Gauss–Newton term (which equals the KL estimate)."""

    layer: str
    kl_items: list[float]
    first_order_items: list[float]

    @property
    def delta_loss_items(self) -> list[float]:
        return [f + k for f, k in zip(self.first_order_items, self.kl_items)]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without gradients inside the context: backward passes reach hidden states only."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def fisher_sketch(logprobs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random cotangent v_t per position with E[v_t v_tᵀ] = F_t = diag(p_t) − p_t p_tᵀ and
    Σ v_t = 0: v_t = √p_t ⊙ ξ_t − p_t (√p_t · ξ_t), ξ_t ~ N(0, I) independent per position.
    (√p ⊙ ξ − p (√p·ξ) = A ξ with A A ᵀ = F.)  Since v_t sums to 0, the gradient of Σ_t v_t · log p_t
    w.r.t. the logits is v_t itself, so one backward gives g_i = J_iᵀ v for every layer, and
    (g_i · δ_i)² is N(0, δ_iᵀ G_i δ_i)² exactly (a χ²₁ multiple): lower variance than sampling
    y_t ~ p_t, whose (e_y − p) has heavy tails where p is peaked."""
    p = logprobs.exp()
    root = p.sqrt()
    xi = torch.randn(logprobs.shape, generator=generator, device=logprobs.device, dtype=logprobs.dtype)
    return root * xi - p * (root * xi).sum(-1, keepdim=True)


def fisher_screen(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    *,
    batch_size: int = 8,
    seed: int = 0,
    samples: int = SAMPLES,
    progress: bool = False,
    **select,
) -> list[Screened]:
    """Screen estimates (module docstring) for every decoder layer the injector selects."""
    if samples < 1:
        raise ValueError(f"the Fisher screen needs at least 1 sample per item, got samples={samples}")
    view = ModelView(model)
    layers = dict(view.layers)
    injector = QuantInjector(model, fmt, point, seed=seed, **select)
    names = selected_layers(model, injector)
    rows = {name: Screened(name, [], []) for name in names}
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    with injector, _frozen(model):
        for input_ids, mask, lengths in answer_batches(tokenizer, items, batch_size, device, progress):
            with injector.paused(), torch.enable_grad():
                record = record_layers(model, input_ids, mask, trace=True)
                inputs, outputs = record.inputs, record.outputs
                logprobs = view.head_logprobs(record.final, lengths)
            with torch.no_grad():
                deltas = []
                for name in tqdm(names, desc="screen", unit="layer", disable=not progress):
                    with injector.restricted(lambda m, p=name + ".": m.startswith(p)):
                        deltas.append(inputs[name].run(layers[name], inputs[name].hidden) - outputs[name].detach())
            answers = [input_ids[i, start:length] for i, (length, start) in enumerate(lengths)]
            objectives = [
                [F.one_hot(t, lp.shape[-1]).to(lp.dtype) for lp, t in zip(logprobs, answers)],
                *([fisher_sketch(lp.detach(), generator) for lp in logprobs] for _ in range(samples)),
            ]
            dots = []  # per objective: (layers, items) of g_i · δ_i
            for n, weights in enumerate(objectives):
                total = sum((w * lp).sum() for w, lp in zip(weights, logprobs))
                grads = torch.autograd.grad(total, [outputs[name] for name in names], retain_graph=n < samples)
                dots.append(torch.stack([(g.float() * d.float()).sum(dim=(1, 2)) for g, d in zip(grads, deltas)]))
            ntok = torch.tensor([len(t) for t in answers], dtype=torch.float64, device=device)
            first = -dots[0].double() / ntok
            kl = 0.5 * torch.stack(dots[1:]).double().square().mean(0) / ntok
            for j, name in enumerate(names):
                rows[name].first_order_items += first[j].tolist()
                rows[name].kl_items += kl[j].tolist()
    return list(rows.values())


def check_mode(mode: str) -> str:
    if mode not in ATTRIBUTION_MODES:
        raise ValueError(f"attribution mode {mode!r} is not one of {', '.join(ATTRIBUTION_MODES)}")
    return mode


def screened_attribution(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    *,
    mode: str = "screen",
    flagged: Collection[str] = (),
    top_k: int = TOP_K,
    batch_size: int = 8,
    seed: int = 0,
    samples: int = SAMPLES,
    progress: bool = False,
    **select,
) -> tuple[list[Attribution], list[Screened]]:
    """``(exact rows, screen rows)``.  ``exact``: the exact attribution of every layer, no screen.
    ``screen``: the Fisher screen of every layer, then the exact attribution of its ``top_k`` by
    KL, of the ``flagged`` layers (those the detectors flagged) and of any with a non-finite
    estimate (so a NaN is reported from exact numbers)."""
    kw = dict(batch_size=batch_size, seed=seed, progress=progress, **select)
    if check_mode(mode) == "none":
        return [], []
    if mode == "exact":
        return loss_attribution(model, tokenizer, items, fmt, point, **kw), []
    screen = fisher_screen(model, tokenizer, items, fmt, point, samples=samples, **kw)
    nonfinite = {r.layer for r in screen if not np.isfinite([*r.kl_items, *r.first_order_items]).all()}
    chosen = {r.layer for r in ranked(screen)[:top_k]} | set(flagged) | nonfinite
    return loss_attribution(model, tokenizer, items, fmt, point, only=chosen, **kw), screen
