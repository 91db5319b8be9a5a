"""Cutting a tensor into quantization blocks and putting it back together.

1-D blocks run along one ``axis``; 2-D blocks are true ``r x c`` tiles of the last two dims
(not ``r*c`` consecutive flattened elements).  Partial blocks are zero-padded, which leaves
every block's amax unchanged, and the padding is dropped on the way back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockLayout:
    """The block structure of one tensor shape: ``split`` gives ``(..., nblocks..., numel)``."""

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    axis: int  # normalised; 1-D blocks only (2-D tiles always use the last two dims)

    @property
    def _moved_shape(self) -> tuple[int, ...]:
        if len(self.block_shape) == 1:
            return (*self.shape[: self.axis], *self.shape[self.axis + 1 :], self.shape[self.axis])
        return self.shape

    @property
    def _padded(self) -> tuple[int, ...]:
        k = len(self.block_shape)
        return tuple(-(-d // b) * b for d, b in zip(self._moved_shape[-k:], self.block_shape))

    @property
    def blocks_shape(self) -> tuple[int, ...]:
        """Shape of ``split``'s result: leading dims, block counts, elements per block."""
        k = len(self.block_shape)
        counts = tuple(p // b for p, b in zip(self._padded, self.block_shape))
        return (*self._moved_shape[:-k], *counts, math.prod(self.block_shape))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.block_shape)
        if k == 1:
            x = x.movedim(self.axis, -1)
        pad: list[int] = []
        for d, p in zip(reversed(x.shape[-k:]), reversed(self._padded)):
            pad += [0, p - d]
        if any(pad):
            x = F.pad(x, pad)
        lead = x.shape[:-k]
        tiles = [n for p, b in zip(self._padded, self.block_shape) for n in (p // b, b)]
        x = x.reshape(*lead, *tiles)
        if k == 2:
            x = x.transpose(-3, -2)
        return x.reshape(self.blocks_shape)

    def merge(self, blocks: torch.Tensor) -> torch.Tensor:
        k = len(self.block_shape)
        lead = self.blocks_shape[: -1 - k]
        counts = self.blocks_shape[-1 - k : -1]
        x = blocks.reshape(*lead, *counts, *self.block_shape)
        if k == 2:
            x = x.transpose(-3, -2)
        x = x.reshape(*lead, *self._padded)
        moved = self._moved_shape
        x = x[(..., *(slice(0, d) for d in moved[-k:]))]
        if k == 1:
            x = x.movedim(-1, self.axis)
        return x
