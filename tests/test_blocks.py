"""BlockLayout: split/merge round trips and the exact contents of blocks and tiles."""

from __future__ import annotations

import pytest
import torch

from harness.formats.blocks import BlockLayout


@pytest.mark.parametrize(
    "shape, block_shape, axis",
    [
        ((4, 64), (32,), 1),
        ((3, 45), (32,), 1),
        ((45, 3), (16,), 0),
        ((2, 5, 33), (32,), 1),
        ((70, 45), (32, 32), 1),
        ((2, 3, 33, 65), (32, 32), 3),
        ((0, 32), (32,), 1),
    ],
)
def test_split_merge_round_trip(shape, block_shape, axis) -> None:
    x = torch.randn(shape)
    layout = BlockLayout(shape, block_shape, axis)
    blocks = layout.split(x)
    assert tuple(blocks.shape) == layout.blocks_shape
    assert torch.equal(layout.merge(blocks), x)


def test_1d_blocks_run_along_the_axis_and_pad_with_zeros() -> None:
    x = torch.arange(2 * 40, dtype=torch.float32).reshape(40, 2)
    blocks = BlockLayout((40, 2), (32,), 0).split(x)
    assert blocks.shape == (2, 2, 32)  # (column, block along dim 0, element)
    assert torch.equal(blocks[1, 0], x[:32, 1])
    assert torch.equal(blocks[1, 1], torch.cat([x[32:, 1], torch.zeros(24)]))


def test_2d_tiles_are_true_tiles() -> None:
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    blocks = BlockLayout((64, 64), (32, 32), 1).split(x)
    assert blocks.shape == (2, 2, 1024)
    assert torch.equal(blocks[0, 1], x[:32, 32:].reshape(-1))
    assert torch.equal(blocks[1, 0], x[32:, :32].reshape(-1))
