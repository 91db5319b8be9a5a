"""Seeded test tensors for the formats suite: the distributions and edge cases the issues name
(Normal and Student-t from :mod:`harness.testing`, shared with the asv benchmarks), and the
parity cases every bit-exactness test runs."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import Format, get_format
from harness.testing import normal, student_t
from harness.testing import seeded as generator

__all__ = ["CASES", "DTYPES", "edge_magnitudes", "exact_ties", "normal", "sr_neighbours", "student_t"]


def exact_ties(fmt: Format, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Blocks whose elements sit exactly on grid points and midpoints between them.

    The block's first element is ``2**emax_elem`` (so the MX scale is exactly 1 before the
    random power-of-two factor; for real-valued scales the divisor, so ``amax / divisor = 1``)
    and the others are drawn from the grid and its midpoints.
    """
    g = generator(seed)
    grid = torch.tensor(fmt.element.grid())
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    values = points[torch.randint(len(points), shape, generator=g)]
    values = values * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    block = fmt.block_shape[-1] if fmt.block_shape else shape[-1]
    values[..., ::block] = 2.0**fmt.element.emax if fmt.microscaling else fmt.scale.divisor
    return values * 2.0 ** torch.randint(-20, 21, (*shape[:-1], 1), generator=g).float()


def edge_magnitudes(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Rows at extreme magnitudes: 1e-30, fp32 subnormals, 1e30, near fp32 max, and rows that
    mix tiny and huge values in one block (deadzone)."""
    g = generator(seed)
    base = torch.randn(shape, generator=g)
    scales = torch.tensor([1.0, 1e-30, 1e-39, 1e-44, 1e30, 1.1e38, 3.0e38, 1.0])[torch.arange(shape[0]) % 8].reshape(
        -1, *([1] * (len(shape) - 1))
    )
    x = (base * scales).clamp(-3.3e38, 3.3e38)  # finite in bf16 too (max 3.39e38)
    mixed = torch.randn(shape[1:], generator=g) * torch.where(torch.rand(shape[1:], generator=g) < 0.1, 1e5, 1e-30)
    x[-1] = mixed
    return x


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

CASES = {
    "normal": lambda fmt: normal((8, 128)),
    "student_t": lambda fmt: student_t((8, 128), seed=1),
    "ties": lambda fmt: exact_ties(fmt, (64, 64), seed=2),
    "edge_magnitudes": lambda fmt: edge_magnitudes((16, 64), seed=3),
    "partial_blocks": lambda fmt: normal((70, 45), seed=4),
    "nan_inf_blocks": lambda fmt: _with_non_finite(normal((64, 64), seed=5)),
}


def _with_non_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 3], x[5, 40], x[33, 7], x[40, 63] = math.nan, math.inf, -math.inf, math.nan
    return x


def sr_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 stochastic rounding's two candidates. Per element: the grid points just below and
    above |x| / scale, and the block scale, from the spec (scale = 2**(floor(log2(amax)) - 2), E2M1 grid)."""
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.exp2((torch.frexp(amax).exponent - 1 - 2).float())
    grid = torch.tensor(get_format("mxfp4").element.grid())
    v = (blocks / scale).abs().clamp(max=grid[-1])
    hi_idx = torch.searchsorted(grid, v).clamp(max=len(grid) - 1)
    lo_idx = torch.where(grid[hi_idx] == v, hi_idx, hi_idx - 1)
    return grid[lo_idx], grid[hi_idx], scale
