from pathlib import Path

import pytest

from harness.data import gsm8k_dir as resolve_gsm8k_dir

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def gsm8k_dir(pytestconfig: pytest.Config) -> Path:
    """The local GSM8K folder (--gsm8k-dir or $HARNESS_GSM8K_DIR)."""
    return resolve_gsm8k_dir(pytestconfig.getoption("--gsm8k-dir"))
