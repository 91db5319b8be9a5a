"""Helpers the suites use to parameterize over formats with readable ids and format markers."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from harness.formats import FORMATS, get_format, list_formats


def format_marks(*names: str) -> list[pytest.MarkDecorator]:
    """The pytest markers of the named formats (``-m mxfp4`` selects every case carrying one)."""
    return [getattr(pytest.mark, m) for m in dict.fromkeys(get_format(n).marker for n in names)]


def format_marker_lines() -> list[str]:
    """``"marker: description"`` of every format marker in the registry (for ``--strict-markers``)."""
    names: dict[str, list[str]] = {}
    for f in FORMATS.values():
        names.setdefault(f.marker, []).append(f.name)
    return [f"{m}: cases of {', '.join(n)}" for m, n in names.items()]


def format_params(names: Iterable[str] | None = None, *, where=None) -> list:
    """One ``pytest.param`` per format, id = the format name, marked with its format marker.

    ``where`` filters registry entries (e.g. ``lambda f: not f.stochastic``).
    """
    chosen = list(names) if names is not None else list_formats()
    if where is not None:
        chosen = [n for n in chosen if where(get_format(n))]
    return [pytest.param(n, id=n, marks=format_marks(n)) for n in chosen]


def worker_device(worker_id: str, gpu: bool, device_count: int) -> torch.device:
    """The device of one pytest-xdist worker (design §12): ``gwN`` gets GPU ``N mod count``, so
    ``pytest -n <number of GPUs> --gpu`` runs one worker per GPU; without xdist (``master``) GPU 0;
    CPU runs stay on ``cpu``."""
    if not gpu:
        return torch.device("cpu")
    if device_count < 1:
        raise ValueError(f"--gpu needs at least one CUDA device, found {device_count}")
    index = int(worker_id[2:]) if worker_id.startswith("gw") and worker_id[2:].isdigit() else 0
    return torch.device("cuda", index % device_count)
