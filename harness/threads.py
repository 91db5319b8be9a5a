"""torch's intra-op thread count, set for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread within the block (the previous count restored after): for small
    tensors, where a parallel region's start-up on a loaded machine costs more than the work,
    and where results must not depend on the thread count (CPU reductions' last bits do)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
