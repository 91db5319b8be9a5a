"""The gate's exit codes are a contract: 0 pass, 1 a measured regression (a diverged candidate
included), 2 everything else (inconclusive, not comparable, unreadable), with one line naming the
file and the problem and never a traceback; per-item documents name their items and data set, so
runs on different items are never paired; a count beyond the data is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.peritem import SCHEMA, DocumentError, PerItemDocument, dataset_of, read_document

TEXTS = [f"Question: item {i}\nAnswer: {i}" for i in range(40)]


def document(values: dict[str, list], texts: list[str] = TEXTS, ids: list | None = None) -> PerItemDocument:
    n = len(next(iter(values.values())))
    return PerItemDocument(
        kind="eval loss",
        model={"name": "m"},
        recipe={"format": "mxfp4"},
        dataset=dataset_of("gsm8k test", texts[:n]),
        item_ids=tuple(ids if ids is not None else range(n)),
        per_item={k: tuple(v) for k, v in values.items()},
    )


def write(path: Path, doc: PerItemDocument | dict | str) -> str:
    text = doc.dumps() if isinstance(doc, PerItemDocument) else doc if isinstance(doc, str) else json.dumps(doc)
    path.write_text(text)
    return str(path)


BASE = [1.0 + 0.01 * i for i in range(40)]


def gate(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["gate", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.strip().splitlines()


def test_pass_regression_inconclusive(tmp_path, capsys) -> None:
    base = write(tmp_path / "a.json", document({"loss": BASE}))
    same = write(tmp_path / "b.json", document({"loss": [x * (1 + 5e-4) for x in BASE]}))
    worse = write(tmp_path / "c.json", document({"loss": [x * 1.05 for x in BASE]}))
    noisy = write(tmp_path / "d.json", document({"loss": [x + (0.3 if i % 2 else -0.3) for i, x in enumerate(BASE)]}))
    assert gate(capsys, base, same)[0] == 0
    code, lines = gate(capsys, base, worse)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("loss: REGRESSION")
    code, lines = gate(capsys, base, noisy)
    assert code == 2 and len(lines) == 1 and "INCONCLUSIVE" in lines[0] and "minimal detectable drop" in lines[0]


@pytest.mark.parametrize("literal", ["Infinity", "NaN", '"inf"', '"nan"', "-Infinity"])
def test_a_diverged_candidate_is_a_regression(tmp_path, capsys, literal: str) -> None:
    """``eval loss --json`` on a diverged model: an item's loss is Inf or NaN (bare literals from
    older writers, strings from this one); a top-1 agreement of -inf is as diverged."""
    base = write(tmp_path / "a.json", document({"loss": BASE}))
    text = document({"loss": [7.0, *BASE[1:]]}).dumps().replace("7.0", literal, 1)
    code, lines = gate(capsys, base, write(tmp_path / "b.json", text))
    assert code == 1 and len(lines) == 1 and "diverged: 1 of 40" in lines[0]
    code, lines = gate(capsys, write(tmp_path / "b.json", text), base)  # a diverged baseline: not comparable
    assert code == 2 and "not comparable" in lines[0] and "non-finite" in lines[0]


def _valid() -> dict:
    return document({"loss": BASE[:4]}).to_json()


def _with(**changes) -> str:
    doc = _valid()
    for key, value in changes.items():
        doc[key] = value
    return json.dumps(doc)


UNREADABLE = {
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "deep nesting in details": _with(details={"x": "PLACEHOLDER"}).replace(
        '"PLACEHOLDER"', "[" * 50_000 + "]" * 50_000
    ),
    "null in a list": _with(per_item={"loss": [1.0, None, 1.0, 1.0]}),
    "an object in a list": _with(per_item={"loss": [1.0, {"v": 1}, 1.0, 1.0]}),
    "a string number": _with(per_item={"loss": [1.0, "0.5", 1.0, 1.0]}),
    "a boolean": _with(per_item={"loss": [1.0, True, 1.0, 1.0]}),
    "a list of lists": _with(per_item={"loss": [[1.0], [1.0], [1.0], [1.0]]}),
    "per_item a list": _with(per_item=[1.0, 1.0, 1.0, 1.0]),
    "per_item empty": _with(per_item={}),
    "a short list": _with(per_item={"loss": [1.0, 1.0, 1.0]}),
    "ids a string": _with(item_ids="0123"),
    "boolean ids": _with(item_ids=[True, False, 2, 3]),
    "duplicate ids": _with(item_ids=[0, 0, 1, 2]),
    "dataset missing": _with(dataset=None),
    "a top-level list": json.dumps([_valid()]),
    "a number": "3",
    "not JSON": "{not json",
    "empty": "",
    "invalid UTF-8": b"\xff\xfe\xfa".decode("latin-1"),
    "another schema version": _with(schema_version=2),
    "an older document": json.dumps({"per_item": {"loss": [1.0] * 4}}),
    "another JSON": json.dumps({"format": "mxfp4"}),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_or_unexpected_input_exits_2_with_one_line_naming_the_file(tmp_path, capsys, case: str) -> None:
    good = write(tmp_path / "good.json", document({"loss": BASE[:4]}))
    bad = tmp_path / "bad.json"
    text = UNREADABLE[case]
    bad.write_bytes(text.encode("latin-1") if case == "invalid UTF-8" else text.encode())
    for args, role in (((good, str(bad)), "candidate"), ((str(bad), good), "baseline")):
        code, lines = gate(capsys, *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"unreadable: {role} {bad}: "), lines


def test_missing_files_and_directories_exit_2(tmp_path, capsys) -> None:
    good = write(tmp_path / "good.json", document({"loss": BASE[:4]}))
    for bad, why in ((tmp_path / "nope.json", "cannot read it"), (tmp_path, "is a directory")):
        code, lines = gate(capsys, good, str(bad))
        assert code == 2 and lines == [f"unreadable: candidate {bad}: {why}" + lines[0].split(why, 1)[1]]


def test_runs_on_different_items_are_not_comparable(tmp_path, capsys) -> None:
    """Same count, another copy of the data (other texts), or other ids: never paired item by item."""
    base = write(tmp_path / "a.json", document({"loss": BASE}))
    other_data = write(tmp_path / "b.json", document({"loss": BASE}, texts=[t + "!" for t in TEXTS]))
    code, lines = gate(capsys, base, other_data)
    assert code == 2 and lines[0].startswith("not comparable: different data sets: gsm8k test (40 items")
    other_ids = write(tmp_path / "c.json", document({"loss": BASE}, ids=list(range(1, 41))))
    code, lines = gate(capsys, base, other_ids)
    assert code == 2 and lines == [
        "not comparable: different item ids (40 vs 40 items, not the same ids in the same order)"
    ]
    fewer = write(tmp_path / "d.json", document({"loss": BASE[:39]}))
    assert gate(capsys, base, fewer)[0] == 2


def test_metric_choice_and_bad_settings_exit_2(tmp_path, capsys) -> None:
    doc = write(tmp_path / "a.json", document({"loss": BASE, "kl": BASE, "rouge": BASE}))
    code, lines = gate(capsys, doc, doc, "--metric", "bleu")
    assert code == 2 and lines == ["not comparable: metric 'bleu' is not in both documents; shared: loss, kl, rouge"]
    code, lines = gate(capsys, doc, doc, "--metric", "rouge")
    assert code == 2 and "no gate for metric 'rouge'" in lines[0]
    code, lines = gate(capsys, doc, doc, "--metric", "loss", "--metric", "kl")
    assert code == 0 and len(lines) == 2 and all("PASS" in line for line in lines)
    assert gate(capsys, doc, doc, "--alpha", "0.7")[0] == 2
    assert gate(capsys, doc, doc, "--margin", "nan")[0] == 2


def test_the_document_round_trips_and_refuses_inconsistent_construction() -> None:
    doc = document({"loss": [1.0, float("inf"), float("nan")], "kl": [0.0, 0.1, 0.2]})
    text = doc.dumps()
    assert "Infinity" not in text and "NaN" not in text and json.loads(text)["schema"] == SCHEMA
    back = PerItemDocument.from_json(json.loads(text))
    assert back.item_ids == doc.item_ids and back.dataset == doc.dataset and back.per_item["kl"] == (0.0, 0.1, 0.2)
    assert str(back.per_item["loss"][1]) == "inf" and str(back.per_item["loss"][2]) == "nan"
    with pytest.raises(DocumentError, match=r"2 item ids .* for a data set of 3 items"):
        PerItemDocument("eval loss", {}, {}, dataset_of("d", "abc"), (0, 1), {"loss": (1.0, 1.0)})
    with pytest.raises(DocumentError, match=r"per_item.loss has 2 values for 3 items"):
        PerItemDocument("eval loss", {}, {}, dataset_of("d", "abc"), (0, 1, 2), {"loss": (1.0, 1.0)})


def test_read_document_names_the_file_and_the_place(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(_with(per_item={"loss": [1.0, None, 1.0, 1.0]}))
    with pytest.raises(DocumentError) as err:
        read_document(path, "baseline")
    assert (
        str(err.value)
        == f'baseline {path}: per_item.loss[1] is null, not a number (a JSON number, or "inf", "-inf", "nan")'
    )


def _gsm8k(folder: Path, n: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) for i in range(n)]
    for split in ("test", "train"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "loss", "--format", "mxfp4", "--items", "32"],
        ["eval", "gsm8k", "--task", "gsm8k_bpb", "--limit", "32"],
        ["scan", "--format", "mxfp4", "--prompts", "32", "--eval-items", "0"],
    ],
)
def test_asking_for_more_items_than_the_data_holds_is_a_usage_error(tmp_path, capsys, monkeypatch, argv) -> None:
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--model", "tiny-llama", "--gsm8k-dir", _gsm8k(tmp_path / "data", 8)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "asked for 32" in err[0] and "holds 8 (valid: at most 8)" in err[0]


def test_eval_loss_json_is_a_per_item_document_the_gate_reads(tmp_path, capsys) -> None:
    data = _gsm8k(tmp_path / "data", 4)
    argv = ["eval", "loss", "--model", "tiny-llama", "--format", "mxfp4", "--items", "4", "--gsm8k-dir", data, "--json"]
    assert main(argv) == 0
    out = tmp_path / "run.json"
    out.write_text(capsys.readouterr().out)
    doc = read_document(out)
    assert doc.kind == "eval loss" and doc.item_ids == (0, 1, 2, 3) and doc.dataset.items == 4
    assert set(doc.per_item) == {"reference_loss", "loss", "kl", "top1_agree"} and doc.recipe["modules"] == 14
    assert {"architecture", "weights_sha256"} <= set(doc.model) and doc.provenance["command"] == "eval loss"
    assert main(["gate", str(out), str(out)]) == 0  # the same run: a pass
    assert capsys.readouterr().out.startswith("loss: PASS")


PLUGIN_TEST = """
import math, os
def test_case(baseline):
    values = [1.0 + 0.01 * i for i in range(40)]
    if os.environ.get("DIVERGE"):
        values[3] = math.inf
    baseline.check("case", {"n": 40}, items={"loss": values})
"""


def test_the_plugin_fails_a_diverged_candidate_even_with_accept_inconclusive(
    pytester: pytest.Pytester, monkeypatch
) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p harness.pytest_plugin\n")
    pytester.makepyfile(test_diverge=PLUGIN_TEST)
    pytester.runpytest_subprocess("--harness-update-baselines").assert_outcomes(passed=1)
    pytester.runpytest_subprocess("--harness-accept-inconclusive").assert_outcomes(passed=1)
    monkeypatch.setenv("DIVERGE", "1")
    result = pytester.runpytest_subprocess("--harness-accept-inconclusive")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*loss: REGRESSION: the candidate diverged: 1 of 40*"])


def test_eval_gsm8k_documents_are_gated_on_strict_exact_match(tmp_path, capsys) -> None:
    """Two `eval gsm8k --output` documents of 250 items: the same answers pass; 15 answers lost
    (6 points, none gained) are a regression; the metric defaults to strict exact match."""
    from harness.eval.gsm8k import Gsm8kResult, Gsm8kRuns

    texts = [f"Question: q{i}\nAnswer: {i}" for i in range(250)]

    def run(strict: list[float], name: str) -> str:
        per_item = {"exact_match,strict-match": strict, "exact_match,flexible-extract": strict}
        result = Gsm8kResult("gsm8k", 250, {}, per_item, [], {}, {"task": "harness_gsm8k"}, list(range(250)))
        doc = Gsm8kRuns("m", "mxfp4", "weight", "float32", "gsm8k", {"mxfp4": result}).document(
            model={}, dataset=dataset_of("gsm8k test", texts)
        )
        return write(tmp_path / name, doc)

    right = [1.0] * 175 + [0.0] * 75
    base = run(right, "a.json")
    code, lines = gate(capsys, base, run(right, "b.json"))
    assert code == 0 and len(lines) == 1 and lines[0].startswith("exact_match,strict-match: PASS")
    code, lines = gate(capsys, base, run([0.0] * 15 + right[15:], "c.json"))
    assert code == 1 and lines[0].startswith("exact_match,strict-match: REGRESSION")
