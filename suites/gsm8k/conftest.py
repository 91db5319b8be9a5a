"""Memoized lm-eval GSM8K runs of the model under test, shared by the gsm8k suite's cases."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from harness.eval import REFERENCE
from harness.eval.gsm8k import Gsm8kResult, evaluate_gsm8k
from harness.inject import QuantInjector


@pytest.fixture(scope="session")
def gsm8k_run(model_under_test, pytestconfig: pytest.Config) -> Callable[..., Gsm8kResult]:
    """``gsm8k_run(fmt, task, limit, **options)``: the model with ``fmt`` on its weights (W4A16;
    ``"reference"``: no quantization) through lm-eval, evaluated once per session."""
    model, tok = model_under_test.model, model_under_test.tokenizer

    @functools.cache  # keyword options in another order are another key: the cases pass them alike
    def run(fmt: str, task: str, limit: int, **options) -> Gsm8kResult:
        kwargs = dict(limit=limit, data_dir=pytestconfig.getoption("--gsm8k-dir"), **options)
        if fmt == REFERENCE:
            return evaluate_gsm8k(model, tok, task, **kwargs)
        with QuantInjector(model, fmt, "weight", seed=0):
            return evaluate_gsm8k(model, tok, task, **kwargs)

    return run
