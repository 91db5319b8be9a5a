"""The formats suite's backend fixture: every case on both paths of ``fake_quantize``."""

from __future__ import annotations

import os

import pytest

from harness.formats import default_backend
from harness.formats.fast import unavailable_reason


def pytest_configure(config: pytest.Config) -> None:
    """Without ``--gpu`` the Triton kernel runs in Triton's CPU interpreter (test_triton_parity.py,
    test_fast_paths.py), also on a GPU machine; set before the kernel module is imported (at collection)."""
    if not config.getoption("--gpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, params=["fast", "reference"])
def backend(request: pytest.FixtureRequest):
    """Every formats case runs on both paths of ``fake_quantize``: the C fast path (where a
    format has one; others fall back) and the reference tensor ops; their bits must agree."""
    if request.param == "fast" and unavailable_reason():
        pytest.skip(f"fast path unavailable here: {unavailable_reason()}")
    with default_backend("auto" if request.param == "fast" else "reference"):
        yield request.param
