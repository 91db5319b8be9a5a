"""One BOS policy (harness.batching): the loss, the scans and lm-eval's bits per byte all start
a text with exactly one prefix token, the tokenizer's BOS or else its EOS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.batching import encode, prefix_token_id
from harness.eval.loss import answer_spans
from harness.gsm8k import Gsm8kItem
from harness.models import byte_tokenizer, load_model

TEXT = "Question: What is 2 + 3?\nAnswer: 5"


def tokenizer_with_bos():
    """The byte tokenizer with a BOS that it adds itself (as Llama's tokenizer does)."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("ab")["input_ids"][0] == tok.bos_token_id  # it really adds BOS by default
    return tok


def test_eos_starts_the_text_when_the_tokenizer_has_no_bos() -> None:
    tok = byte_tokenizer()
    assert tok.bos_token_id is None
    assert encode(tok, "ab") == [tok.eos_token_id, *tok("ab")["input_ids"]]


def test_a_tokenizer_that_adds_bos_itself_gets_exactly_one() -> None:
    tok = tokenizer_with_bos()
    ids = encode(tok, "ab")
    assert ids[0] == prefix_token_id(tok) == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1 and len(ids) == 3


def test_answer_spans_start_after_the_prefix() -> None:
    tok = byte_tokenizer()
    item = Gsm8kItem("What is 2 + 3?", "5")
    [(ids, start)] = answer_spans(tok, [item])
    assert ids[0] == tok.eos_token_id
    assert tok.decode(ids[start:]) == " 5"  # the answer tokens, nothing of the prompt


def test_lm_eval_rolling_loglikelihood_conditions_on_the_same_prefix() -> None:
    """lm-eval's bits-per-byte request (loglikelihood_rolling) of a text equals the NLL of every
    token of ``encode(text)`` after the first: the loss, the scans and bpb see the same sequence."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load_model("tiny-llama")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu", prefix_token_id=prefix_token_id(tok))
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0)], disable_tqdm=True)
    ids = encode(tok, TEXT)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    direct = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
    assert math.isfinite(direct) and rolling == pytest.approx(direct, rel=1e-4)
