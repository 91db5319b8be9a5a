"""Answer-token loss, KL(ref || quant) and top-1 agreement on GSM8K items (the pair llama.cpp's
``perplexity --kl-divergence`` reports).

``loss``: the text ``Question: {q}\\nAnswer: {a}`` is tokenized once under the harness's BOS
policy (``harness.batching.encode``: one BOS, else EOS, then the text without special tokens,
as lm-eval's rolling loglikelihood does); the answer tokens are those past the length of
``Question: {q}\\nAnswer:`` tokenized the same way; ``loss`` is the token-weighted mean NLL
over all answer tokens of all items (per-item means feed the paired statistics).  ``kl`` and
``top1_agree`` compare the next-token distributions of the reference (injector paused) and the
quantized model at the same positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.batching import encode, padded_batches
from harness.eval.stats import PairedComparison, compare_paired
from harness.gsm8k import Gsm8kItem
from harness.peritem import Dataset, PerItemDocument, provenance

EVAL_BATCH_SIZE = 8  # sequences per forward pass of an evaluation (a memory/speed knob, no effect on the numbers)


@dataclass
class LossResult:
    """Per-item sums over answer tokens, for the reference and (optionally) the quantized model."""

    n_tokens: list[int] = field(default_factory=list)
    reference_nll: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    top1_agree: list[int] = field(default_factory=list)
    reference_entropy: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.n_tokens)

    def _mean(self, sums: list[float]) -> float:
        return sum(sums) / sum(self.n_tokens)

    def summary(self) -> dict[str, float]:
        """Token-weighted means, plus the paired comparison of per-item mean losses."""
        out = {"n": self.n, "tokens": sum(self.n_tokens), "reference_loss": self._mean(self.reference_nll)}
        if self.nll:
            out |= {
                "loss": self._mean(self.nll),
                "kl": self._mean(self.kl),
                "top1_agree": self._mean(self.top1_agree),
                "reference_entropy": self._mean(self.reference_entropy),
                "entropy": self._mean(self.entropy),
            }
            out["p_value"] = self.comparison().p_value
        return out

    def item_losses(self, sums: list[float]) -> list[float]:
        return [s / t for s, t in zip(sums, self.n_tokens)]

    def per_item(self) -> dict[str, list[float]]:
        """Per-item means over each item's answer tokens (what ``python -m harness gate`` reads)."""
        out = {"reference_loss": self.item_losses(self.reference_nll)}
        if self.nll:
            out |= {k: self.item_losses(getattr(self, k)) for k in ("nll", "kl", "top1_agree")}
            out["loss"] = out.pop("nll")
        return out

    def comparison(self) -> PairedComparison:
        return compare_paired(self.item_losses(self.reference_nll), self.item_losses(self.nll))

    def document(
        self, *, model: dict, recipe: dict, dataset: Dataset, item_ids: tuple[int, ...] | None = None
    ) -> PerItemDocument:
        """The ``eval loss --json`` document (:class:`harness.peritem.PerItemDocument`, what
        ``python -m harness gate`` reads): :meth:`per_item` on items ``item_ids`` (default
        ``0 … n-1``) of ``dataset``, :meth:`summary` as the aggregate, the paired comparison in
        ``details``."""
        details = {"comparison": self.comparison().as_dict()} if self.nll else {}
        return PerItemDocument(
            kind="eval loss",
            model=model,
            recipe=recipe,
            dataset=dataset,
            item_ids=tuple(range(self.n)) if item_ids is None else item_ids,
            per_item={k: tuple(v) for k, v in self.per_item().items()},
            aggregate=self.summary(),
            provenance=provenance("eval loss"),
            details=details,
        )


def answer_spans(tokenizer, items: Sequence[Gsm8kItem]) -> list[tuple[list[int], int]]:
    """Per item: the token ids of the full text and the index of its first answer token."""
    spans = []
    for item in items:
        ids = encode(tokenizer, item.text)
        start = len(encode(tokenizer, item.prompt))
        if start >= len(ids):
            raise ValueError(f"item has no answer tokens after its prompt: {item.question[:60]!r}")
        spans.append((ids, start))
    return spans


def answer_batches(tokenizer, items: Sequence[Gsm8kItem], batch_size: int, device: torch.device, progress: bool):
    """Right-padded batches: (input_ids, attention_mask, [(length, first answer index)])."""
    spans = answer_spans(tokenizer, items)
    batches = padded_batches(tokenizer, [ids for ids, _ in spans], batch_size, device, desc="loss", progress=progress)
    for b, (input_ids, mask) in enumerate(batches):
        yield input_ids, mask, [(len(ids), start) for ids, start in spans[b * batch_size : (b + 1) * batch_size]]


def _answer_positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    """The positions whose logits predict the answer tokens ``start … length - 1`` (the logits at
    ``p`` predict token ``p + 1``)."""
    return torch.arange(start - 1, length - 1, device=device)


def _answer_logprobs(model, input_ids, mask, lengths) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item: next-token log-probs at the positions predicting answer tokens, and the targets."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    out = []
    for i, (length, start) in enumerate(lengths):
        pos = _answer_positions(start, length, logits.device)
        out.append((F.log_softmax(logits[i, pos], dim=-1), input_ids[i, pos + 1]))
    return out


def _entropy_sum(logprobs: torch.Tensor) -> float:
    """Σ over positions of the predictive entropy −Σ p log p (nats)."""
    return float(-(logprobs.exp() * logprobs).sum())


def answer_means(logprobs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Token-weighted mean answer NLL and predictive entropy of :func:`answer_logprobs` (summed
    per item, then over items: the same numbers as :meth:`LossResult.summary`)."""
    nll = [-lp.gather(-1, target[:, None]).sum().item() for lp, target in logprobs]
    entropy = [_entropy_sum(lp) for lp, _ in logprobs]
    tokens = sum(len(target) for _, target in logprobs)
    return sum(nll) / tokens, sum(entropy) / tokens


def answer_loss(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, lengths) -> torch.Tensor:
    """Differentiable token-weighted answer NLL of one batch (the training objective)."""
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    total, count = logits.new_zeros(()), 0
    for i, (length, start) in enumerate(lengths):
        pos = _answer_positions(start, length, logits.device)
        total = total + F.cross_entropy(logits[i, pos], input_ids[i, pos + 1], reduction="sum")
        count += len(pos)
    return total / count


@torch.no_grad()
def answer_logprobs(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per item: the answer-token log-probs of ``model`` as it is now (unquantized, or under
    whatever injector is active) and the targets, computed once and passed as ``against`` to
    every :func:`evaluate_loss` that compares with this model (fp32, about 200 KB per answer
    token for a 49k vocabulary)."""
    device = next(model.parameters()).device
    return [
        lp
        for input_ids, mask, lengths in answer_batches(tokenizer, items, batch_size, device, progress)
        for lp in _answer_logprobs(model, input_ids, mask, lengths)
    ]


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    injector=None,
    *,
    against: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = False,
) -> LossResult:
    """Reference loss of ``model`` and, when ``injector`` (an entered QuantInjector on the same
    model) is given, the quantized loss, KL and top-1 agreement.  The reference pass runs with
    the injector paused, batch by batch, unless ``against`` (:func:`answer_logprobs` of the model
    to compare with, e.g. the unquantized one, computed once) is given: its numbers are then the
    ``reference_*`` ones."""
    device = next(model.parameters()).device
    result = LossResult()
    k = 0
    for input_ids, mask, lengths in answer_batches(tokenizer, items, batch_size, device, progress):
        if against is not None:
            refs = against[k : k + len(lengths)]
        else:
            with injector.paused() if injector is not None else contextlib.nullcontext():
                refs = _answer_logprobs(model, input_ids, mask, lengths)
        k += len(lengths)
        quants = _answer_logprobs(model, input_ids, mask, lengths) if injector is not None else [None] * len(refs)
        for (ref_lp, target), q in zip(refs, quants):
            result.n_tokens.append(len(target))
            result.reference_nll.append(-ref_lp.gather(-1, target[:, None]).sum().item())
            if q is not None:
                q_lp = q[0]
                result.reference_entropy.append(_entropy_sum(ref_lp))
                result.entropy.append(_entropy_sum(q_lp))
                result.nll.append(-q_lp.gather(-1, target[:, None]).sum().item())
                result.kl.append(F.kl_div(q_lp, ref_lp, log_target=True, reduction="sum").item())
                result.top1_agree.append(int((ref_lp.argmax(-1) == q_lp.argmax(-1)).sum().item()))
    return result
