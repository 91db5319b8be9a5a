"""Scan JSON, markdown report, plots and comparison, end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.gsm8k import Gsm8kItem
from harness.models import load_model
from harness.srdd.document import SCHEMA_VERSION, ScanDocument
from harness.srdd.report import compare_scans, write_report
from harness.srdd.run import DETERMINISTIC_RUNS, STOCHASTIC_RUNS, default_instability_runs, scan_model

ITEMS = [Gsm8kItem(f"What is {i} times 3?", f"{i} * 3 = {3 * i}\n#### {3 * i}") for i in range(6)]


@pytest.fixture(scope="module")
def doc() -> ScanDocument:
    model, tok = load_model("tiny-llama")
    return scan_model(
        model,
        tok,
        ITEMS,
        "mxfp4",
        "both",
        model_name="tiny-llama",
        evaluation=ITEMS[:3],
        attribution="screen",
        instability_runs=2,
    )


def test_scan_document_has_the_documented_keys_and_round_trips(doc: ScanDocument) -> None:
    data = json.loads(json.dumps(doc.to_json()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert {"model", "format", "point", "modules", "layers", "attribution", "recommendation"} <= data.keys()
    assert len(data["modules"]) == 14 and len(data["layers"]) == 2
    layer = data["layers"][0]
    assert {"name", "problematic", "reasons", "metrics"} <= layer.keys() and isinstance(layer["problematic"], bool)
    assert {
        "weight_sqnr_db",
        "weight_sqnr_db_floor",
        "input_sqnr_db",
        "output_error",
        "kurtosis_ratio",
        "massive_ratio",
        "gain_ratio",
        "instability",
    } <= layer["metrics"].keys()
    assert {"confirmed", "control_recovery", "action"} <= data["recommendation"].keys()
    assert [a["layer"] for a in data["attribution"]] == ["all", "model.layers.0", "model.layers.1"]
    assert all(len(a["ci"]) == 2 and a["ci"][0] <= a["delta_loss"] <= a["ci"][1] for a in data["attribution"])
    # two-stage: screen estimates of both layers, both in its top 5, so both exact too
    assert [(s["layer"], s["exact"], s["items"]) for s in data["screen"]] == [
        ("model.layers.0", True, 3),
        ("model.layers.1", True, 3),
    ]
    assert ScanDocument.from_json(data) == doc


SAMPLES = Path(__file__).parents[1] / "reports/sample"


@pytest.mark.parametrize(
    "sample",
    [*sorted(SAMPLES.glob("*/results.json")), SAMPLES / "aqn-smollm2-135m-mxfp4-attribution.json"],
    ids=lambda p: p.parent.name if p.name == "results.json" else p.stem,
)
def test_the_committed_samples_are_read(sample: Path) -> None:
    """Version 2 files (before the screen was the default; the AQN sample's scan is one) are read
    with an empty screen, and their verification re-judged by the rank test."""
    doc = ScanDocument.read(sample)
    assert len(doc.layers) == 30 and (doc.screen == []) == (doc.schema_version == 2)
    if doc.schema_version == 2 and doc.recommendation.verification:
        assert "re-judged" in doc.recommendation.verification.verdict


def test_an_old_document_is_refused_with_its_version() -> None:
    with pytest.raises(ValueError, match="schema version 1"):
        ScanDocument.from_json({"schema_version": 1})


def test_report_directory(doc: ScanDocument, tmp_path) -> None:
    summary = write_report(doc, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"summary.md", "results.json", "sqnr.png", "deadzone.png", "attribution.png"} <= names
    text = summary.read_text()
    for section in (
        "## Metric ranges and floors",
        "## Layer groups",
        "## Problematic layers",
        "## Loss attribution",
        "## Sensitivity screen",
        "## Recommendation",
    ):
        assert section in text
    assert "no verdict rests on them" in text
    assert (tmp_path / "sqnr.png").read_bytes()[:4] == b"\x89PNG"
    assert ScanDocument.read(tmp_path / "results.json") == doc


def test_compare_two_scans(doc: ScanDocument) -> None:
    other = ScanDocument.from_json(json.loads(json.dumps(doc.to_json())))
    other.format = "mxfp8_e4m3"
    doc_bad = ScanDocument.from_json(json.loads(json.dumps(doc.to_json())))
    doc_bad.layers[1].problematic = True
    for row in other.layers:
        row.metrics["weight_sqnr_db"] += 12.0
    text = compare_scans(doc_bad, other)
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
        "--heldout-items",
        "3",
        "--gsm8k-dir",
        str(tmp_path),
        "--output",
        str(out),
        "--report-dir",
        str(tmp_path / "rep"),
        "--attribution",
        "screen",
    ]
    assert main(argv) == 0
    assert "# SRDD scan: tiny-qwen2 under nvfp4 (weight)" in capsys.readouterr().out
    scanned = ScanDocument.read(out)
    assert scanned.prompts == 4 and (tmp_path / "rep" / "summary.md").exists()
    assert [s.layer for s in scanned.screen] == [a.layer for a in scanned.attribution[1:]]  # 2 layers: all exact
    assert main(["compare", str(out), str(out)]) == 0
    assert "SRDD comparison" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", str(out), str(tmp_path / "missing.json")])
    assert "not a readable scan JSON" in capsys.readouterr().err


def test_the_instability_scan_runs_more_often_for_stochastic_formats() -> None:
    """The default of ``scan --instability-runs`` (formerly decided in cli.py): a spread needs two
    runs; a stochastic format, whose spread is what is measured, gets more."""
    runs = {f: default_instability_runs(f) for f in ("mxfp4", "nvfp4", "mxfp8_e4m3", "mxfp4_sr")}
    assert runs == {
        "mxfp4": DETERMINISTIC_RUNS,
        "nvfp4": DETERMINISTIC_RUNS,
        "mxfp8_e4m3": DETERMINISTIC_RUNS,
        "mxfp4_sr": STOCHASTIC_RUNS,
    }
    assert STOCHASTIC_RUNS > DETERMINISTIC_RUNS >= 2
