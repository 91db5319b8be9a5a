"""Token ids as every model pass of the harness sees them (one BOS policy), and right-padded
batches of them with their attention masks.

BOS policy, shared by the answer loss (``harness.eval.loss``), every SRDD scan
(``harness.srdd``) and bits-per-byte (``harness.eval.gsm8k``): a text is tokenized *without*
special tokens and preceded by exactly one prefix token, the tokenizer's BOS or, when it has
none, its EOS.  This is what lm-eval's ``HFLM`` does for ``loglikelihood_rolling``
(``prefix_token_id``: ``bos_token_id`` else ``eos_token_id``; texts encoded with
``add_special_tokens=False``), so the loss, the scans and ``gsm8k_bpb`` condition on the same
first token.  It also gives the model the attention-sink token it was trained with: without it
the first real token becomes the sink and carries the model's massive activation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm


def prefix_token_id(tokenizer) -> int:
    """The one token every sequence starts with: BOS, else EOS (lm-eval's ``HFLM.prefix_token_id``)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token to start texts with")
    return token


def encode(tokenizer, text: str) -> list[int]:
    """``[prefix_token_id] + tokenizer(text, add_special_tokens=False)``: the ids of ``text`` under
    the harness's BOS policy (module docstring)."""
    return [prefix_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]


def padded_batches(
    tokenizer,
    sequences: Sequence[list[int]],
    batch_size: int,
    device: torch.device,
    *,
    desc: str = "",
    progress: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` per batch, right-padded with the pad (or eos) token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for b0 in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = sequences[b0 : b0 + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        yield input_ids.to(device), mask.to(device)
