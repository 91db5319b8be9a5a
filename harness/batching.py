"""Right-padded batches of token id lists, with their attention masks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm


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
