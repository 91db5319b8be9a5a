"""Session fixtures of the model suite: the reference log-probs (computed once) and a memo of
quantized evaluations shared by cases and orderings (the model and data: the plugin's
``model_under_test`` and ``loss_items``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from harness.eval.loss import LossResult, answer_logprobs, evaluate_loss
from harness.inject import Coverage, QuantInjector


@pytest.fixture(scope="session")
def reference(model_under_test, loss_items):
    model, tok = model_under_test.model, model_under_test.tokenizer
    return answer_logprobs(model, tok, loss_items)


@pytest.fixture(scope="session")
def coverages() -> dict[tuple[str, str, str], Coverage]:
    """The injector's coverage of each evaluation :func:`quantized_loss` ran, by its arguments."""
    return {}


@pytest.fixture(scope="session")
def quantized_loss(model_under_test, loss_items, reference, coverages) -> Callable[..., LossResult]:
    """``quantized_loss(fmt, point, scale_mode="floor")``: evaluated once per session, then reused;
    its coverage lands in :func:`coverages` (a partial quantization raises: complete or loud)."""
    model, tok = model_under_test.model, model_under_test.tokenizer

    @functools.cache
    def run(fmt: str, point: str, scale_mode: str = "floor") -> LossResult:
        with QuantInjector(model, fmt, point, seed=0, scale_mode=scale_mode) as injector:
            coverages[fmt, point, scale_mode] = injector.coverage
            return evaluate_loss(model, tok, loss_items, injector, against=reference)

    return run
