"""Where the harness keeps things on disk: the user's cache (converted models, compiled kernels)
and the data shipped inside the package (GSM8K). No imports from the rest of the package, so the
formats and the model loader can both use it."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

CACHE_ENV = "HARNESS_CACHE_DIR"


def cache_dir() -> Path:
    """Where converted models and compiled kernels are cached: ``$HARNESS_CACHE_DIR`` (made
    absolute), or ``~/.cache/harness`` when it is unset or empty (never the working directory)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "harness").expanduser().absolute()


def data_dir() -> Path:
    """The data folder shipped inside the package (``harness/datasets``), read through
    ``importlib.resources`` so it is found wherever the package is installed."""
    return Path(str(files("harness") / "datasets"))
