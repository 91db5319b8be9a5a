"""Session fixtures of the model suite: the model under test, its GSM8K items, the reference
log-probs (computed once) and a memo of quantized evaluations shared by cases and orderings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from harness.data import load_gsm8k
from harness.eval.loss import LossResult, evaluate_loss, reference_logprobs
from harness.inject import QuantInjector
from harness.models import load_model

LOSS_ITEMS = 32


@pytest.fixture(scope="session")
def lm(pytestconfig: pytest.Config, device: torch.device):
    """(model, tokenizer) of ``--model`` (default: the embedded SmolLM2-135M), fp32."""
    return load_model(pytestconfig.getoption("--model"), device=device)


@pytest.fixture(scope="session")
def loss_items(pytestconfig: pytest.Config):
    return load_gsm8k("test", LOSS_ITEMS, pytestconfig.getoption("--gsm8k-dir"))


@pytest.fixture(scope="session")
def reference(lm, loss_items):
    model, tok = lm
    return reference_logprobs(model, tok, loss_items)


@pytest.fixture(scope="session")
def quantized_loss(lm, loss_items, reference) -> Callable[[str, str], LossResult]:
    """``quantized_loss(fmt, point)``: evaluated once per session, then reused."""
    model, tok = lm
    memo: dict[tuple[str, str], LossResult] = {}

    def run(fmt: str, point: str) -> LossResult:
        if (fmt, point) not in memo:
            with QuantInjector(model, fmt, point, generator=torch.Generator().manual_seed(0)) as injector:
                memo[fmt, point] = evaluate_loss(model, tok, loss_items, injector, reference=reference)
        return memo[fmt, point]

    return run
