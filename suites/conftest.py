"""Session fixtures every model-level suite shares: the model under test and its GSM8K data."""

from __future__ import annotations

import pytest
import torch

from harness.data import load_gsm8k
from harness.models import load_model, model_identity

LOSS_ITEMS = 32  # design §7: n >= 32, never 5


@pytest.fixture(scope="session")
def lm(pytestconfig: pytest.Config, device: torch.device):
    """(model, tokenizer) of ``--model`` (default: the embedded SmolLM2-135M), fp32, eval mode;
    its identity is what the baseline files record and check (harness.baselines)."""
    model, tok = load_model(pytestconfig.getoption("--model"), device=device)
    pytestconfig.harness_model_identity = model_identity(model)
    return model, tok


@pytest.fixture(scope="session")
def loss_items(pytestconfig: pytest.Config):
    """The first 32 GSM8K test items: the loss/KL evaluation set."""
    return load_gsm8k("test", LOSS_ITEMS, pytestconfig.getoption("--gsm8k-dir"))


@pytest.fixture(scope="session")
def calibration_items(pytestconfig: pytest.Config):
    """The first 32 GSM8K train items: calibration texts for scans."""
    return load_gsm8k("train", 32, pytestconfig.getoption("--gsm8k-dir"))
