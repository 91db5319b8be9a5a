"""Seeded test tensors for the formats suite: the distributions and edge cases the issues name."""

from __future__ import annotations

import torch

from harness.formats import Format


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed))


def student_t(shape: tuple[int, ...], seed: int = 0, df: float = 2.0) -> torch.Tensor:
    """Heavy-tailed data (Student-t, df=2): z / sqrt(chi2_df / df), seeded."""
    g = generator(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((*shape, int(df)), generator=g).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


def exact_ties(fmt: Format, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Blocks whose elements sit exactly on grid points and midpoints between them.

    The block's first element is ``2**emax_elem`` (so the MX scale is exactly 1 before the
    random power-of-two factor) and the others are drawn from the grid and its midpoints.
    """
    g = generator(seed)
    grid = torch.tensor(fmt.element.grid())
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    values = points[torch.randint(len(points), shape, generator=g)]
    values = values * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    block = fmt.block_shape[-1]
    values[..., ::block] = 2.0**fmt.element.emax
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
