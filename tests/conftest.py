from pathlib import Path

import pytest

from harness.gsm8k import gsm8k_dir as resolve_gsm8k_dir

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def gsm8k_dir(pytestconfig: pytest.Config) -> Path:
    """The GSM8K folder: --gsm8k-dir, $HARNESS_GSM8K_DIR or the copy shipped in the package."""
    return resolve_gsm8k_dir(pytestconfig.getoption("--gsm8k-dir"))
