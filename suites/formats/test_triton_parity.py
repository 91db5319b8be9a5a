"""The Triton kernel (the CUDA fast path) against the reference path, bit for bit, on the parity
suite's cases. With ``--gpu`` it runs compiled on CUDA; otherwise under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by this suite's conftest before Triton is imported, unless
``--gpu``), so its arithmetic is checked even where no GPU is lent. Skipped when triton is not
installed."""

from __future__ import annotations

import pytest
import torch

from harness.formats import fake_quantize, get_format, nvfp4_per_tensor_scale
from harness.formats.fast import fake_quantize_fast
from harness.testing import assert_same_bits, format_params
from suites.formats.data import CASES, DTYPES

pytest.importorskip("triton", reason="triton is not installed: the CUDA fast path is not available here")
from harness.formats.triton_kernel import fake_quantize_triton

ONE_D = format_params(where=lambda f: not f.stochastic and len(f.block_shape) == 1 and f.microscaling)


@pytest.fixture(params=["triton"])
def backend(request):
    """This module tests the kernel directly: one run, not one per default backend."""
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ONE_D)
def test_triton_kernel_matches_reference(name: str, case: str, dtype: torch.dtype, device: torch.device) -> None:
    fmt = get_format(name)
    x = CASES[case](fmt).to(dtype)
    for axis in (1, 0):
        got = fake_quantize_fast(x.to(device), fmt, axis, None, kernel=fake_quantize_triton).cpu()
        assert_same_bits(got, fake_quantize(x, name, axis=axis, backend="reference"), f"{name}/{case}/axis{axis}")


@pytest.mark.nvfp4
def test_triton_kernel_two_level_nvfp4(device: torch.device) -> None:
    x = CASES["student_t"](get_format("nvfp4"))
    pts = nvfp4_per_tensor_scale(x)
    got = fake_quantize_fast(x.to(device), get_format("nvfp4"), 1, pts.to(device), kernel=fake_quantize_triton).cpu()
    assert_same_bits(got, fake_quantize(x, "nvfp4", per_tensor_scale=pts, backend="reference"), "nvfp4+pts")
