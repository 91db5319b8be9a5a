"""Bit parity with an independent scalar reference of the spec (reference.py) on the cases
that break sloppy quantizers: exact ties, 1e-30, fp32 subnormals, 1e30, near fp32 max,
mixed tiny/huge blocks, partial blocks, NaN/Inf blocks, fp32 and bf16."""

from __future__ import annotations

import math

import pytest
import torch

from harness.formats import fake_quantize, get_format, nvfp4_per_tensor_scale
from harness.testing import format_params
from suites.formats import data
from suites.formats.conftest import assert_same_bits
from suites.formats.reference import reference_fake_quantize

DETERMINISTIC = format_params(where=lambda f: not f.stochastic)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

CASES = {
    "normal": lambda fmt: data.normal((8, 128)),
    "student_t": lambda fmt: data.student_t((8, 128), seed=1),
    "ties": lambda fmt: data.exact_ties(fmt, (64, 64), seed=2),
    "edge_magnitudes": lambda fmt: data.edge_magnitudes((16, 64), seed=3),
    "partial_blocks": lambda fmt: data.normal((70, 45), seed=4),
    "nan_inf_blocks": lambda fmt: _with_non_finite(data.normal((64, 64), seed=5)),
}


def _with_non_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 3], x[5, 40], x[33, 7], x[40, 63] = math.nan, math.inf, -math.inf, math.nan
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_scalar_reference(name: str, case: str, dtype: torch.dtype, device: torch.device) -> None:
    """Computed on the suite's device, compared with the CPU scalar reference on the same data."""
    fmt = get_format(name)
    x = CASES[case](fmt).to(dtype)
    got = fake_quantize(x.to(device), name).cpu()
    assert_same_bits(got, reference_fake_quantize(x, fmt), f"{name}/{case}/{dtype}")


@pytest.mark.nvfp4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["normal", "student_t", "edge_magnitudes", "partial_blocks"])
def test_nvfp4_two_level_matches_scalar_reference(case: str, dtype: torch.dtype, device: torch.device) -> None:
    fmt = get_format("nvfp4")
    x = CASES[case](fmt).to(dtype)
    pts = nvfp4_per_tensor_scale(x)
    expected = reference_fake_quantize(x, fmt, per_tensor_scale=pts.item())
    got = fake_quantize(x.to(device), "nvfp4", per_tensor_scale=pts.to(device)).cpu()
    assert_same_bits(got, expected, f"nvfp4+pts/{case}")
