"""The format registry and the pytest wiring that depends on it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

from harness.formats import FORMATS, Format, get_format, list_formats
from harness.pytest_plugin import format_markers
from harness.testing import format_marker, format_params


def test_the_formats_of_the_design() -> None:
    """The nine block formats, then the deployed formats with these names exactly (scripts rely on them)."""
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
        "fp8_e4m3_tensor",
        "fp8_e4m3_row",
        "fp8_e4m3_g128",
        "fp8_e4m3_b128",
        "fp8_e4m3_g128_ue8m0",
        "int8_row",
        "int8_tensor",
        "int8_row_vllm",
        "int4_g128",
        "int4_g128_asym",
    ]


def test_granularity_and_scale_are_data() -> None:
    groupings = {f.name: f.grouping for f in FORMATS.values()}
    assert groupings["fp8_e4m3_tensor"] == "tensor" and groupings["int8_row"] == "row"
    assert groupings["fp8_e4m3_b128"] == groupings["mxfp4_2d"] == "tile"
    assert groupings["int4_g128"] == groupings["mxfp4"] == "block"
    assert get_format("int4_g128").scale.divisor == 7.5 and get_format("int8_row_vllm").scale.divisor == 127
    assert get_format("int4_g128_asym").scale.asymmetric and get_format("fp8_e4m3_g128_ue8m0").scale.power_of_two
    assert all(f.library for f in FORMATS.values())


def test_bits_per_element() -> None:
    assert get_format("mxfp4").bits_per_element == 4.25
    assert get_format("mxfp4_2d").bits_per_element == 4 + 8 / 1024
    assert get_format("nvfp4").bits_per_element == 4.5
    assert get_format("mxfp8_e4m3").bits_per_element == 8.25
    assert get_format("mxint8").bits_per_element == 8.25  # 8-bit two's complement + E8M0 per 32
    assert get_format("int4_g128").bits_per_element == 4 + 16 / 128  # a bf16 scale per 128
    assert get_format("int4_g128_asym").bits_per_element == 4 + 24 / 128  # and an int8 zero point
    assert get_format("int8_row").bits_per_element == 8  # one scale per row: not counted


def test_every_format_marker_is_registered(pytestconfig: pytest.Config) -> None:
    """The suites' markers: the format families (generated from the registry by the plugin) and the
    suite markers, all registered under --strict-markers."""
    registered = {m.split(":")[0] for m in pytestconfig.getini("markers")}
    families = {"mxfp4", "mxfp4_sr", "mxfp4_2d", "mxfp6", "mxfp8", "mxint8", "nvfp4", "fp8", "int8", "int4"}
    assert {format_marker(n) for n in list_formats()} == families
    suites = {"srdd", "aqn", "gsm8k", "bench", "slow", "gpu"}
    assert families | suites <= registered


def test_a_new_format_gets_its_marker_without_a_list_to_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    fp6 = get_format("mxfp6_e2m3")
    monkeypatch.setitem(FORMATS, "mxfp6_e1m4", replace(fp6, name="mxfp6_e1m4"))
    monkeypatch.setitem(FORMATS, "int4_block", replace(fp6, name="int4_block"))
    markers = format_markers()
    assert markers["mxfp6"] == "cases of mxfp6_e2m3 and mxfp6_e3m2 and mxfp6_e1m4" and "int4_block" in markers


def test_the_registry_carries_no_pytest_names_and_imports_no_model_loader() -> None:
    assert "marker" not in {f.name for f in fields(Format)}
    loaded = "sorted(m for m in sys.modules if m.startswith(('harness.models', 'pytest', 'transformers')))"
    code = f"import sys, harness.formats; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_format_params_carry_ids_and_markers() -> None:
    params = {p.id: p for p in format_params()}
    assert set(params) == set(list_formats())
    assert [m.name for m in params["mxfp6_e3m2"].marks] == ["mxfp6"]
    assert [p.id for p in format_params(where=lambda f: f.stochastic)] == ["mxfp4_sr"]


def test_get_format_error_names_the_valid_formats() -> None:
    with pytest.raises(ValueError, match=r"unknown format 'MXFP4'; valid formats: mxfp4, mxfp4_sr"):
        get_format("MXFP4")
