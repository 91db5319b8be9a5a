"""The format registry and the pytest wiring that depends on it."""

from __future__ import annotations

import pytest

from harness.formats import FORMATS, get_format, list_formats
from harness.testing import format_params


def test_the_nine_formats_of_the_design() -> None:
    assert list_formats() == [
        "mxfp4",
        "mxfp4_sr",
        "mxfp4_2d",
        "mxfp6_e2m3",
        "mxfp6_e3m2",
        "mxfp8_e4m3",
        "mxfp8_e5m2",
        "mxint8",
        "nvfp4",
    ]


def test_bits_per_element() -> None:
    assert get_format("mxfp4").bits_per_element == 4.25
    assert get_format("mxfp4_2d").bits_per_element == 4 + 8 / 1024
    assert get_format("nvfp4").bits_per_element == 4.5
    assert get_format("mxfp8_e4m3").bits_per_element == 8.25
    assert get_format("mxint8").bits_per_element == 8.25  # 8-bit two's complement + E8M0 per 32


def test_every_format_marker_is_registered(pytestconfig: pytest.Config) -> None:
    registered = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    assert {f.marker for f in FORMATS.values()} <= registered
    assert {
        "mxfp4",
        "mxfp4_sr",
        "mxfp4_2d",
        "mxfp6",
        "mxfp8",
        "nvfp4",
        "srdd",
        "aqn",
        "gsm8k",
        "bench",
        "slow",
        "gpu",
    } <= registered


def test_format_params_carry_ids_and_markers() -> None:
    params = {p.id: p for p in format_params()}
    assert set(params) == set(list_formats())
    assert [m.name for m in params["mxfp6_e3m2"].marks] == ["mxfp6"]
    assert [p.id for p in format_params(where=lambda f: f.stochastic)] == ["mxfp4_sr"]


def test_get_format_error_names_the_valid_formats() -> None:
    with pytest.raises(ValueError, match=r"unknown format 'MXFP4'; valid formats: mxfp4, mxfp4_sr"):
        get_format("MXFP4")
