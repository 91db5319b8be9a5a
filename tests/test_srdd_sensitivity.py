"""The Fisher sensitivity screen (``harness.srdd.sensitivity``) against a direct computation, and
the two-stage attribution: exact rows unchanged, picked from the screen's top and the flagged."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from srdd_models import ITEMS, PLANTED, gaussian_model, planted_model, scan

from harness.eval.loss import answer_batches
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd.attribution import loss_attribution, ranked
from harness.srdd.sensitivity import fisher_screen, screened_attribution

LAYER = "model.layers.2"


@contextlib.contextmanager
def layer_output_hook(module, fn):
    handle = module.register_forward_hook(
        lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    )
    try:
        yield
    finally:
        handle.remove()


def direct_terms(model, tok, items, layer: str):
    """Per item, from first principles: δ = layer output with only ``layer`` quantized minus the
    reference's (two full forwards); in float64, with the layer's output shifted by ε·δ,
    the first-order term −d/dε Σ_t log p_t(a_t) (autograd on the scalar ε) and the Fisher form
    ½ Σ_t δz_tᵀ (diag p_t − p_t p_tᵀ) δz_t with δz_t = dz_t/dε by central differences;
    both per answer token."""
    module = dict(ModelView(model).layers)[layer]
    (input_ids, mask, lengths) = next(answer_batches(tok, items, len(items), torch.device("cpu"), False))
    outs = []
    with QuantInjector(model, "mxfp4", "weight") as inj, torch.no_grad():
        for active in (lambda n: False, lambda n: n.startswith(layer + ".")):
            with inj.restricted(active), layer_output_hook(module, lambda h: outs.append(h) or h):
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    delta = (outs[1] - outs[0]).double()
    model64 = gaussian_model()[0].double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    module64 = dict(ModelView(model64).layers)[layer]

    def logits(eps):
        with layer_output_hook(module64, lambda h: h + eps * delta):
            return model64(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    z0 = logits(eps)
    step = 1e-4
    with torch.no_grad():
        dz = (logits(step) - logits(-step)) / (2 * step)
    first, fisher = [], []
    for i, (length, start) in enumerate(lengths):
        pos = torch.arange(start - 1, length - 1)
        logp = F.log_softmax(z0[i, pos], -1)
        (grad,) = torch.autograd.grad(logp.gather(-1, input_ids[i, pos + 1, None]).sum(), eps, retain_graph=True)
        p, d = logp.detach().exp(), dz[i, pos]
        quad = ((p * d * d).sum(-1) - (p * d).sum(-1) ** 2).sum()
        first.append(-grad.item() / len(pos))
        fisher.append(0.5 * quad.item() / len(pos))
    return first, fisher


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_screen_equals_the_first_order_term_and_the_fisher_form_computed_directly(planted) -> None:
    """First order: the same derivative, so equal to float32 rounding.  KL: the mean of ``S``
    draws of ½(g·δ)² is unbiased for the Fisher form with relative standard error √(2/S) for
    Gaussian g·δ (7 % at S = 400): the pooled mean must agree within 4 of those."""
    model, tok = planted
    items = ITEMS[:4]
    first, fisher = direct_terms(model, tok, items, LAYER)
    screen = {r.layer: r for r in fisher_screen(model, tok, items, "mxfp4", "weight", samples=400)}[LAYER]
    assert screen.first_order_items == pytest.approx(first, rel=1e-3, abs=1e-7)
    assert sum(screen.kl_items) == pytest.approx(sum(fisher), rel=4 * math.sqrt(2 / 400))
    assert min(fisher) > 0


def test_planted_layer_is_ranked_first_by_the_screen(planted) -> None:
    model, tok = planted
    rows = ranked(fisher_screen(model, tok, ITEMS, "mxfp4", "weight"))
    assert rows[0].layer == PLANTED


def test_two_stage_runs_the_exact_attribution_on_the_screens_top_and_the_flagged(planted) -> None:
    """The exact rows are those of the screen's top 2 and the flagged layer 5, each with the
    very numbers of the exact run over every layer; no verdict comes from the screen."""
    model, tok = planted
    items = ITEMS[:8]
    exact, screen = screened_attribution(model, tok, items, "mxfp4", "weight", top_k=2, flagged=["model.layers.5"])
    top = [r.layer for r in ranked(screen)[:2]]
    assert PLANTED in top and len(screen) == 6
    assert [r.layer for r in exact] == ["all", *sorted({*top, "model.layers.5"})]
    everything = {r.layer: r for r in loss_attribution(model, tok, items, "mxfp4", "weight")}
    for row in exact:
        assert (row.delta_loss_items, row.kl_items) == (
            everything[row.layer].delta_loss_items,
            everything[row.layer].kl_items,
        )
    assert screened_attribution(model, tok, items, "mxfp4", "weight", mode="exact")[1] == []
    with pytest.raises(ValueError, match="'fast' is not one of screen, exact, none"):
        screened_attribution(model, tok, items, "mxfp4", "weight", mode="fast")


def test_screen_mode_reaches_the_exact_modes_verdicts_on_the_planted_model(planted) -> None:
    """Same rules fire on the same layers and tensors whichever attribution ran (the planted
    layer only, by its floors), and the planted layer has an exact row in both."""
    model, tok = planted
    docs = {mode: scan(model, tok, "mxfp4", attribution=mode, do_verify=False) for mode in ("exact", "screen")}
    verdicts = {
        mode: [[(r.rule, r.metric, r.tensor) for r in layer.reasons] for layer in doc.layers]
        for mode, doc in docs.items()
    }
    assert verdicts["screen"] == verdicts["exact"]
    assert [i for i, reasons in enumerate(verdicts["exact"]) if reasons] == [3]
    assert PLANTED in {a.layer for a in docs["screen"].attribution} and len(docs["screen"].screen) == 6
