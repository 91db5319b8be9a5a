"""GSM8K through lm-eval on the model under test.

CPU: ``gsm8k_bpb`` (bits per byte of question + answer, the continuous signal) for the reference
and each headline format against stored baselines and in the order the formats' precision
predicts; a small generation run proving the exact-match path end to end and reproducible.
GPU (``--gpu --model <real model>``): 5-shot exact match against the model's own baselines,
gated by a paired significance test (what the nightly job runs)."""

from __future__ import annotations

import math

import pytest
import torch

from harness.eval import REFERENCE
from harness.eval.gsm8k import compare_results, evaluate_gsm8k
from harness.gsm8k import load_gsm8k
from harness.inject import QuantInjector
from harness.testing import format_marks

pytestmark = pytest.mark.gsm8k

BPB_ITEMS = 32  # n >= 32 for paired statistics
BPB_FORMATS = ("mxfp8_e4m3", "nvfp4", "mxfp4")
BPB_SLOW = {"nvfp4"}  # ~30 s per format here: CI runs the two the ordering test needs
GPU_FORMATS = ("mxfp8_e4m3", "nvfp4", "mxfp4")
GPU_DEFAULT_LIMIT = 250


def fmt_params(names, slow=()):
    return [pytest.param(REFERENCE, id=REFERENCE)] + [
        pytest.param(n, id=f"{n}-w4a16", marks=[*format_marks(n), *([pytest.mark.slow] if n in slow else [])])
        for n in names
    ]


@pytest.mark.parametrize("fmt", fmt_params(BPB_FORMATS, slow=BPB_SLOW))
def test_bpb_against_baseline(fmt: str, model_under_test, gsm8k_run, baseline, metrics) -> None:
    result = gsm8k_run(fmt, "gsm8k_bpb", BPB_ITEMS)
    bpb, wppl = result.metrics["bits_per_byte,none"], result.metrics["word_perplexity,none"]
    metrics.record(bits_per_byte=bpb, word_perplexity=wppl, n=result.n)
    assert result.n == BPB_ITEMS
    assert 0 < bpb < 8 and wppl > 1
    baseline.check(
        f"{fmt}-gsm8k_bpb-{model_under_test.dtype_id}",
        {"bits_per_byte": bpb, "word_perplexity": wppl},
    )


@pytest.mark.parametrize(
    "names", [pytest.param(("mxfp8_e4m3", "mxfp4"), id="mxfp8_e4m3-mxfp4", marks=format_marks("mxfp8_e4m3", "mxfp4"))]
)
def test_bpb_orders_formats(names: tuple[str, ...], gsm8k_run) -> None:
    """reference < MXFP8 < MXFP4 in bits per byte, and MXFP4's increase over the reference is
    significant on the 32 paired per-item values (it is ~+0.06 bpb on SmolLM2; see baselines)."""
    ref = gsm8k_run(REFERENCE, "gsm8k_bpb", BPB_ITEMS)
    runs = [gsm8k_run(n, "gsm8k_bpb", BPB_ITEMS) for n in names]
    values = [r.metrics["bits_per_byte,none"] for r in (ref, *runs)]
    assert values == sorted(values), dict(zip((REFERENCE, *names), values))
    cmp = compare_results(ref.per_item, runs[-1].per_item)["bits_per_byte,none"]
    assert cmp.significant and cmp.mean_diff > 0, cmp


@pytest.mark.mxfp4
def test_bpb_agrees_with_a_direct_computation(gsm8k_run, model_under_test, pytestconfig) -> None:
    """lm-eval's number, recomputed without lm-eval on the same quantized model: bits per byte of
    item i = -sum log p(token_t | prefix, tokens_<t) / UTF-8 bytes / ln 2, the prefix being the BOS
    (else EOS) token as lm-eval's rolling log-likelihood uses, one unpadded forward pass per item
    (the first 8 items: each is its own check)."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    result = gsm8k_run("mxfp4", "gsm8k_bpb", BPB_ITEMS)
    items = load_gsm8k("test", 8, pytestconfig.getoption("--gsm8k-dir"))
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    direct = []
    with QuantInjector(model, "mxfp4", "weight"), torch.no_grad():
        for item in items:
            ids = tok(item.text, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([[prefix, *ids]], device=device)).logits[0, :-1].float()
            nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids, device=device)[:, None]).sum()
            direct.append(float(nll) / len(item.text.encode("utf-8")) / math.log(2))
    assert result.per_item["bits_per_byte,none"][: len(items)] == pytest.approx(direct, rel=1e-4)


@pytest.mark.mxfp4
def test_generation_exact_match_path_is_reproducible(gsm8k_run, model_under_test, pytestconfig) -> None:
    """5-shot greedy generation under MXFP4 through lm-eval's HFLM: responses stop at the stop list
    or the cap, both filters score every item, and a second run gives the same responses bit for
    bit (the 135M model's accuracy is ~0, so only the path is checked here; accuracy: --gpu)."""
    first = gsm8k_run("mxfp4", "gsm8k", 1, max_gen_toks=48)
    model, tok = model_under_test.model, model_under_test.tokenizer
    with QuantInjector(model, "mxfp4", "weight"):  # a second, independent run (not memoized)
        second = evaluate_gsm8k(
            model, tok, "gsm8k", limit=1, max_gen_toks=48, data_dir=pytestconfig.getoption("--gsm8k-dir")
        )
    assert first.settings["n_shot"] == 5 and first.n == 1
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert len(first.per_item[key]) == 1 and first.per_item[key][0] in (0.0, 1.0)
    responses = [s["response"] for s in first.samples]
    assert all(isinstance(r, str) and r and "\n\n" not in r and "Question:" not in r for r in responses)
    assert responses == [s["response"] for s in second.samples]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("fmt", fmt_params(GPU_FORMATS))
def test_accuracy_against_baseline(fmt: str, gsm8k_run, baseline, metrics, pytestconfig) -> None:
    """5-shot exact match on the first --gsm8k-limit test items (default 250), gated against the
    baseline's items by harness.gate (strict and flexible match as one Holm family): a drop shown
    to exceed 1.5 points (exact McNemar and the bound against half the margin) fails, a pass needs
    the CI to exclude a 3-point drop, and anything else is inconclusive (fails unless
    --accept-inconclusive)."""
    limit = pytestconfig.getoption("--gsm8k-limit") or GPU_DEFAULT_LIMIT
    result = gsm8k_run(fmt, "gsm8k", limit, batch_size=32)
    strict, flexible = result.per_item["exact_match,strict-match"], result.per_item["exact_match,flexible-extract"]
    metrics.record(
        strict_exact_match=result.metrics["exact_match,strict-match"],
        flexible_exact_match=result.metrics["exact_match,flexible-extract"],
        n=result.n,
    )
    assert result.n == limit
    baseline.check(
        f"{fmt}-gsm8k-5shot-n{limit}",
        {"n": result.n},
        items={"strict_exact_match": strict, "flexible_exact_match": flexible},
    )
