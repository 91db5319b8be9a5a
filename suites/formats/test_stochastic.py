"""``mxfp4_sr``: unbiased stochastic rounding between the two neighbouring grid points, driven
only by the given ``torch.Generator``."""

from __future__ import annotations

import pytest
import torch

from harness.formats import fake_quantize
from suites.formats import data

pytestmark = pytest.mark.mxfp4_sr
DRAWS = 400


def test_every_draw_is_one_of_the_two_neighbours(device: torch.device) -> None:
    x = data.normal((16, 64), seed=50)
    lo, hi, scale = data.sr_neighbours(x)
    for seed in range(20):
        g = torch.Generator(device).manual_seed(seed)
        out = fake_quantize(x.to(device), "mxfp4_sr", generator=g).cpu().reshape(-1, 32)
        mag = (out / scale).abs()
        assert ((mag == lo) | (mag == hi)).all()
        assert (torch.sign(out) * torch.sign(x.reshape(-1, 32)) >= 0).all()


def test_mean_of_draws_is_unbiased(device: torch.device) -> None:
    """The mean of N draws is within 5 standard errors of x, element by element, where the
    standard error of a two-point draw is step * sqrt(p(1-p)/N)."""
    x = data.normal((8, 64), seed=51)
    lo, hi, scale = data.sr_neighbours(x)
    inside = x.reshape(-1, 32).abs() / scale <= 6.0  # saturated values are deterministic
    g, on_device = torch.Generator(device).manual_seed(52), x.to(device)
    draws = torch.stack([fake_quantize(on_device, "mxfp4_sr", generator=g).cpu() for _ in range(DRAWS)])
    draws = draws.reshape(DRAWS, -1, 32)
    mean = draws.mean(0)
    step = (hi - lo) * scale
    p = torch.where(step > 0, (x.reshape(-1, 32).abs() - lo * scale) / step.clamp(min=1e-30), 0.0)
    se = step * (p * (1 - p) / DRAWS).sqrt()
    err = (mean - x.reshape(-1, 32)).abs()
    assert (err[inside] <= 5 * se[inside] + 1e-7).all()
    assert (step[inside] > 0).any() and (err[inside] > 0).any()  # really random, really tested


def test_reproducible_per_seed_and_different_across_seeds(device: torch.device) -> None:
    x = data.normal((16, 64), seed=53).to(device)

    def run(seed: int) -> torch.Tensor:
        return fake_quantize(x, "mxfp4_sr", generator=torch.Generator(device).manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_deterministic_formats_ignore_the_generator(device: torch.device) -> None:
    x = data.normal((16, 64), seed=54).to(device)
    a = fake_quantize(x, "mxfp4", generator=torch.Generator(device).manual_seed(1))
    b = fake_quantize(x, "mxfp4", generator=torch.Generator(device).manual_seed(2))
    assert torch.equal(a, b)
