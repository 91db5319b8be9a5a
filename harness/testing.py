"""Helpers the suites use to parameterize over formats with readable ids and format markers."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from harness.formats import get_format, list_formats


def format_marks(*names: str) -> list[pytest.MarkDecorator]:
    """The pytest markers of the named formats (``-m mxfp4`` selects every case carrying one)."""
    return [getattr(pytest.mark, m) for m in dict.fromkeys(get_format(n).marker for n in names)]


def format_params(names: Iterable[str] | None = None, *, where=None) -> list:
    """One ``pytest.param`` per format, id = the format name, marked with its format marker.

    ``where`` filters registry entries (e.g. ``lambda f: not f.stochastic``).
    """
    chosen = list(names) if names is not None else list_formats()
    if where is not None:
        chosen = [n for n in chosen if where(get_format(n))]
    return [pytest.param(n, id=n, marks=format_marks(n)) for n in chosen]
