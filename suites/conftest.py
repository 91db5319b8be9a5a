"""The suites' name for the model under test (the plugin's ``model_under_test`` fixture)."""

from __future__ import annotations

import pytest

from harness.pytest_plugin import ModelUnderTest


@pytest.fixture(scope="session")
def lm(model_under_test: ModelUnderTest):
    """(model, tokenizer) of ``--model``: what the suites' cases unpack."""
    return model_under_test.model, model_under_test.tokenizer
