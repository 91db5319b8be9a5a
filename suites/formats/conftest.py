"""Shared helpers of the formats suite."""

from __future__ import annotations

import os

import pytest
import torch

from harness.formats import default_backend
from harness.formats.fast import unavailable_reason


def pytest_configure(config: pytest.Config) -> None:
    """Without ``--gpu`` the Triton kernel runs in Triton's CPU interpreter (test_triton_parity.py),
    also on a GPU machine; set before the kernel module is imported (at collection)."""
    if not config.getoption("--gpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (so -0.0 != +0.0 and NaN == NaN of the same payload), with the
    first mismatches shown."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    a = actual.contiguous().view(INT_VIEW[actual.dtype])
    e = expected.contiguous().view(INT_VIEW[expected.dtype])
    nan_both = torch.isnan(actual) & torch.isnan(expected)
    bad = (a != e) & ~nan_both
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        shown = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values differ, e.g. (index, got, want) {shown}"
        )


@pytest.fixture(autouse=True, params=["fast", "reference"])
def backend(request: pytest.FixtureRequest):
    """Every formats case runs on both paths of ``fake_quantize``: the C fast path (where a
    format has one; others fall back) and the reference tensor ops; their bits must agree."""
    if request.param == "fast" and unavailable_reason():
        pytest.skip(f"fast path unavailable here: {unavailable_reason()}")
    with default_backend("auto" if request.param == "fast" else "reference"):
        yield request.param
