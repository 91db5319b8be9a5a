"""Scan JSON, markdown report, plots and comparison, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.data import Gsm8kItem
from harness.models import load_model
from harness.report import compare_scans, write_report
from harness.srdd.run import scan_model

ITEMS = [Gsm8kItem(f"What is {i} times 3?", f"{i} * 3 = {3 * i}\n#### {3 * i}") for i in range(6)]


@pytest.fixture(scope="module")
def doc() -> dict:
    model, tok = load_model("tiny-llama")
    return scan_model(
        model,
        tok,
        ITEMS,
        "mxfp4",
        "both",
        model_name="tiny-llama",
        evaluation=ITEMS[:3],
        attribution=True,
        instability_runs=2,
    )


def test_scan_document_has_the_documented_keys(doc: dict) -> None:
    assert {"model", "format", "point", "modules", "layers", "attribution", "summary"} <= doc.keys()
    assert len(doc["modules"]) == 14 and len(doc["layers"]) == 2
    layer = doc["layers"][0]
    assert {
        "name",
        "weight_sqnr_db",
        "input_sqnr_db",
        "kurtosis_ratio",
        "gain_ratio",
        "instability",
        "problematic",
        "issues",
    } <= layer.keys()
    assert {"problematic_layers", "recommendation"} <= doc["summary"].keys()
    assert [row["layer"] for row in doc["attribution"]] == ["all", "model.layers.0", "model.layers.1"]
    json.dumps(doc)  # serialisable


def test_report_directory(doc: dict, tmp_path) -> None:
    summary = write_report(doc, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.md", "results.json", "sqnr.png", "deadzone.png", "attribution.png"} <= names
    text = summary.read_text()
    for section in (
        "## Metric ranges against thresholds",
        "## Layer groups",
        "## Problematic layers",
        "## Loss attribution",
        "## Recommendation",
    ):
        assert section in text
    assert (tmp_path / "sqnr.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["format"] == "mxfp4"


def test_compare_two_scans(doc: dict) -> None:
    other = json.loads(json.dumps(doc))
    other["format"] = "mxfp8_e4m3"
    for row in other["layers"]:
        row["weight_sqnr_db"] += 12.0
        row["problematic"] = False
    text = compare_scans(doc, other)
    assert "A = tiny-llama/mxfp4/both, B = tiny-llama/mxfp8_e4m3/both" in text
    assert "yes → no" in text and "model.layers.1" in text


def test_cli_scan_and_compare(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps({"question": it.question, "answer": it.answer}) for it in ITEMS]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    argv = [
        "scan",
        "--model",
        "tiny-qwen2",
        "--format",
        "nvfp4",
        "--point",
        "weight",
        "--prompts",
        "4",
        "--eval-items",
        "2",
        "--gsm8k-dir",
        str(tmp_path),
        "--output",
        str(out),
        "--report-dir",
        str(tmp_path / "rep"),
    ]
    assert main(argv) == 0
    assert "# SRDD scan: tiny-qwen2 under nvfp4 (weight)" in capsys.readouterr().out
    assert json.loads(out.read_text())["prompts"] == 4 and (tmp_path / "rep" / "summary.md").exists()
    assert main(["compare", str(out), str(out)]) == 0
    assert "SRDD comparison" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", str(out), str(tmp_path / "missing.json")])
    assert "not a readable scan JSON" in capsys.readouterr().err
