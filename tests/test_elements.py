"""The exact fp32 helpers under every format: floor_log2, exp2_int, grid rounding, codes."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, decode, encode, exp2_int, floor_log2, round_to_grid

ELEMENTS = [pytest.param(e, id=e.name) for e in (E2M1, E2M3, E3M2, E4M3, E5M2)]


def test_floor_log2_is_exact_just_below_powers_of_two() -> None:
    """A float log2 rounds up to k for the fp32 just below 2**k; the exponent field does not."""
    k = torch.arange(-125, 127)
    below = torch.nextafter(torch.exp2(k.float()), torch.tensor(0.0))
    assert torch.equal(floor_log2(below), k - 1)
    assert (torch.floor(torch.log2(below)) == k).any()  # what the experiment's quantizer did
    assert torch.equal(floor_log2(torch.exp2(k.float())), k)
    assert torch.equal(floor_log2(-torch.exp2(k.float())), k)


def test_floor_log2_of_zero_and_subnormals_is_minus_127() -> None:
    assert floor_log2(torch.tensor([0.0, 1e-40, 1e-45])).tolist() == [-127, -127, -127]


def test_exp2_int_is_exact_over_the_whole_fp32_range() -> None:
    e = torch.arange(-149, 128)
    assert exp2_int(e).double().tolist() == [math.ldexp(1.0, int(i)) for i in e]


@pytest.mark.parametrize("elem", ELEMENTS)
def test_grid_matches_the_spec_max_and_counts(elem) -> None:
    grid = elem.grid()
    assert grid[0] == 0.0 and grid[-1] == elem.max_value
    assert len(set(grid)) == len(grid)


def test_known_grids() -> None:
    assert E2M1.grid() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M3.max_value == E2M3.grid()[-1] == 7.5 and E3M2.grid()[-1] == 28.0
    assert (E2M1.emax, E2M3.emax, E3M2.emax, E4M3.emax, E5M2.emax) == (2, 2, 4, 8, 15)


@pytest.mark.parametrize("elem", ELEMENTS)
def test_round_to_grid_is_nearest_even_with_saturation(elem) -> None:
    grid = torch.tensor(elem.grid())
    mids = (grid[1:] + grid[:-1]) / 2
    got = round_to_grid(mids, elem)
    # ties go to the neighbour whose last mantissa bit is 0
    lower_even = (encode(grid[:-1], elem) & 1) == 0
    assert torch.equal(got, torch.where(lower_even, grid[:-1], grid[1:]))
    assert torch.equal(round_to_grid(grid, elem), grid)
    assert round_to_grid(torch.tensor([1e30, -1e30]), elem).tolist() == [elem.max_value, -elem.max_value]
    assert torch.isnan(round_to_grid(torch.tensor([math.nan, math.inf]), elem)).all()


@pytest.mark.parametrize("elem", [pytest.param(E4M3, id="e4m3"), pytest.param(E5M2, id="e5m2")])
def test_round_to_grid_agrees_with_torch_float8_casts(elem) -> None:
    torch_dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[elem.name]
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.linspace(-6, 4, 100_000)
    x = x.clamp(-elem.max_value, elem.max_value)
    assert torch.equal(round_to_grid(x, elem), x.to(torch_dtype).float())


@pytest.mark.parametrize("elem", ELEMENTS)
def test_encode_decode_round_trip_every_code(elem) -> None:
    codes = torch.arange(2**elem.bits, dtype=torch.uint8)
    values = decode(codes, elem)
    finite = values.abs() <= elem.max_value
    assert torch.equal(encode(values[finite], elem), codes[finite])


def test_stochastic_rounding_uses_the_noise() -> None:
    v = torch.full((4,), 0.25)  # halfway between E2M1's 0 and 0.5
    noise = torch.tensor([0.0, 0.49, 0.5, 0.99])
    assert round_to_grid(v, E2M1, noise).tolist() == [0.5, 0.5, 0.0, 0.0]
