"""The answer-loss definition (``harness.eval.loss``) on a tiny model, against a direct per-item computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from harness.eval.loss import LossResult, answer_logprobs, answer_means, evaluate_loss
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.models import load_model

ITEMS = [
    Gsm8kItem("What is 2 + 3?", "2 + 3 = 5\n#### 5"),
    Gsm8kItem("Tom has 4 apples and eats one. How many are left?", "4 - 1 = <<4-1=3>>3\n#### 3"),
    Gsm8kItem("Double 21.", "#### 42"),
]


@torch.no_grad()
def direct_nll(model, tok, item: Gsm8kItem) -> tuple[float, int]:
    """Sum of -log p(answer token) for one item, unbatched, straight from the definition: the
    text without special tokens after one BOS (the tiny tokenizer has none: its EOS)."""
    first = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    ids = first + tok(item.text, add_special_tokens=False)["input_ids"]
    start = 1 + len(tok(item.prompt, add_special_tokens=False)["input_ids"])
    logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))), len(ids) - start


def test_loss_is_the_token_weighted_answer_nll() -> None:
    model, tok = load_model("tiny-llama")
    result = evaluate_loss(model, tok, ITEMS, batch_size=2)  # padding in the first batch
    direct = [direct_nll(model, tok, it) for it in ITEMS]
    assert result.n_tokens == [n for _, n in direct]
    assert result.reference_nll == pytest.approx([s for s, _ in direct], rel=1e-5)
    total = sum(s for s, _ in direct) / sum(n for _, n in direct)
    assert result.summary()["reference_loss"] == pytest.approx(total, rel=1e-5)


def test_untouched_model_has_zero_kl_and_full_agreement() -> None:
    model, tok = load_model("tiny-llama")
    with QuantInjector(model, "mxfp4", overrides={"*": None}) as injector:
        assert injector.modules == []
        s = evaluate_loss(model, tok, ITEMS, injector).summary()
    assert s["kl"] == pytest.approx(0.0, abs=1e-6) and s["top1_agree"] == 1.0 and s["loss"] == s["reference_loss"]


def test_cached_reference_gives_the_same_numbers_as_lockstep() -> None:
    model, tok = load_model("tiny-qwen2")
    ref = answer_logprobs(model, tok, ITEMS, batch_size=3)
    with QuantInjector(model, "mxfp4") as injector:
        lockstep = evaluate_loss(model, tok, ITEMS, injector, batch_size=3).summary()
        cached = evaluate_loss(model, tok, ITEMS, injector, against=ref, batch_size=3).summary()
    assert lockstep == cached
    assert answer_means(ref) == (lockstep["reference_loss"], lockstep["reference_entropy"])  # bit for bit
    assert lockstep["kl"] > 0 and math.isfinite(lockstep["p_value"])


def test_the_json_document_holds_settings_summary_comparison_and_per_item_means() -> None:
    """Two items of 2 and 4 answer tokens: per-item means 1.0, 1.0 (reference) and 1.5, 2.0; the
    document is a per-item document that reads back to the same values."""
    from harness.peritem import PerItemDocument, dataset_of

    result = LossResult([2, 4], [2.0, 4.0], [3.0, 8.0], [0.2, 0.4], [1, 3], [1.0, 2.0], [1.2, 2.4])
    doc = result.document(model={"name": "m"}, recipe={"format": "mxfp4", "modules": 7}, dataset=dataset_of("d", "ab"))
    assert (doc.kind, doc.model, doc.recipe["modules"], doc.aggregate["n"], doc.aggregate["tokens"]) == (
        *("eval loss", {"name": "m"}, 7),
        *(2, 6),
    )
    agg = doc.aggregate
    assert agg["reference_loss"] == 1.0 and agg["loss"] == pytest.approx(11 / 6) and agg["top1_agree"] == 4 / 6
    assert doc.item_ids == (0, 1) and doc.per_item == {
        "reference_loss": (1.0, 1.0),
        "loss": (1.5, 2.0),
        "kl": (0.1, 0.1),
        "top1_agree": (0.5, 0.75),
    }
    details = doc.details["comparison"]
    assert details["mean_diff"] == pytest.approx(0.75) and details["n"] == 2
    assert PerItemDocument.from_json(json.loads(doc.dumps())) == PerItemDocument.from_json(doc.to_json())
    assert PerItemDocument.from_json(json.loads(doc.dumps())).per_item == doc.per_item
