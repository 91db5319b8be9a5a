"""This checkout's own pytest setup. The harness's options, markers and fixtures come from its
pytest plugin (harness/pytest_plugin.py), which `pip install` registers through the `pytest11`
entry point of the same name; naming it here as well lets a checkout run with PYTHONPATH=. and
no install, and is a no-op where the entry point already loaded it. This repository opts in to
the plugin's short option names (`--gpu`, `--model`, ...) beside the `--harness-*` ones."""

import pytest

from harness.pytest_plugin import add_short_options

pytest_plugins = ["harness.pytest_plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_short_options(parser)
