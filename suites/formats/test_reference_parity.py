"""Bit parity with an independent scalar reference of the spec (reference.py) on the cases
that break sloppy quantizers: exact ties, 1e-30, fp32 subnormals, 1e30, near fp32 max,
mixed tiny/huge blocks, partial blocks, NaN/Inf blocks, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from harness.formats import fake_quantize, get_format, nvfp4_per_tensor_scale
from harness.testing import assert_same_bits, format_params
from suites.formats.data import CASES, DTYPES
from suites.formats.reference import reference_fake_quantize

# The block-scaled formats; the real-valued-scale ones are checked against their libraries and
# vLLM rules in test_deployed_parity.py.
DETERMINISTIC = format_params(where=lambda f: not f.stochastic and f.microscaling)


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
