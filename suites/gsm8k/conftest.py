"""Memoized lm-eval GSM8K runs of the model under test, shared by the gsm8k suite's cases."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.eval.gsm8k import Gsm8kResult, evaluate_gsm8k
from harness.inject import QuantInjector

REFERENCE = "reference"


@pytest.fixture(scope="session")
def gsm8k_run(lm, pytestconfig: pytest.Config) -> Callable[..., Gsm8kResult]:
    """``gsm8k_run(fmt, task, limit, **options)``: the model with ``fmt`` on its weights (W4A16;
    ``"reference"``: no quantization) through lm-eval, evaluated once per session."""
    model, tok = lm
    memo: dict[tuple, Gsm8kResult] = {}

    def run(fmt: str, task: str, limit: int, **options) -> Gsm8kResult:
        key = (fmt, task, limit, tuple(sorted(options.items())))
        if key not in memo:
            kwargs = dict(limit=limit, data_dir=pytestconfig.getoption("--gsm8k-dir"), **options)
            if fmt == REFERENCE:
                memo[key] = evaluate_gsm8k(model, tok, task, **kwargs)
            else:
                with QuantInjector(model, fmt, "weight", seed=0):
                    memo[key] = evaluate_gsm8k(model, tok, task, **kwargs)
        return memo[key]

    return run
