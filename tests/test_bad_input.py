"""Bad input (issue 15): every probe gets a one-line error naming the bad value and the valid
choices, exit code 2, no traceback, and is found before any model is loaded or item evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness.models
from harness.cli import main


def _gsm8k(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) for i in range(n)]
    for split in ("test", "train"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model is a test failure: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(harness.models, "load_model", refuse)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The last stderr line of a run that must exit 2 without a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


LOSS = ["eval", "loss", "--model", "tiny-llama", "--format", "mxfp4"]
SCAN = ["scan", "--model", "tiny-llama", "--format", "mxfp8_e4m3", "--no-gain"]
GSM8K = ["eval", "gsm8k", "--model", "tiny-llama", "--task", "gsm8k_bpb"]
AQN = ["aqn", "compare", "--model", "tiny-llama"]
RANGE = "is out of range (valid: an integer >= {})"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*LOSS, "--items", "0"], "argument --items: 0 " + RANGE.format(1)),
        ([*LOSS, "--items", "-3"], "argument --items: -3 " + RANGE.format(1)),
        ([*LOSS, "--items", "many"], "argument --items: 'many' is not an integer (valid: an integer >= 1)"),
        ([*LOSS, "--batch-size", "0"], "argument --batch-size: 0 " + RANGE.format(1)),
        ([*SCAN, "--prompts", "0"], "argument --prompts: 0 " + RANGE.format(1)),
        ([*SCAN, "--eval-items", "-1"], "argument --eval-items: -1 " + RANGE.format(0)),
        ([*GSM8K, "--limit", "0"], "argument --limit: 0 " + RANGE.format(1)),
        ([*GSM8K, "--limit", "-2"], "argument --limit: -2 " + RANGE.format(1)),
        ([*AQN, "--seeds", "0"], "argument --seeds: 0 " + RANGE.format(1)),
        ([*AQN, "--train-items", "0"], "argument --train-items: 0 " + RANGE.format(1)),
        (
            [*AQN, "--targeted-share", "0"],
            "argument --targeted-share: 0.0 is out of range (valid: a fraction in (0, 1])",
        ),
        ([*LOSS, "--device", "bogus"], "argument --device: unknown device 'bogus'; valid devices: cpu"),
        ([*LOSS, "--device", "cuda:99"], "argument --device: device 'cuda:99' is not available; valid devices: cpu"),
        (
            [*SCAN, "--attribution", "--eval-items", "0"],
            "error: --attribution needs evaluation items: --eval-items is 0",
        ),
        ([*SCAN, "--instability-runs", "1"], "error: --instability-runs 1 gives no spread (valid: 0 to skip"),
    ],
)
def test_counts_sizes_and_devices_are_checked_first(argv, message, tmp_path, capsys, no_model_load) -> None:
    line = _usage_error([*argv, "--gsm8k-dir", str(_gsm8k(tmp_path))], capsys)
    assert message in line


@pytest.mark.parametrize("option", ["--output", "--report-dir"])
def test_unusable_outputs_fail_before_the_scan(option: str, tmp_path, capsys, no_model_load) -> None:
    data = str(_gsm8k(tmp_path / "data"))
    folder, a_file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    a_file.write_text("x")
    cases = [
        (str(a_file / "out.json"), f"{a_file} is a file, not a directory"),
        ("/proc/harness-test/out", "cannot write in /proc"),  # unwritable even for root
    ]
    if option == "--output":
        cases.append((str(folder), f"argument --output: '{folder}' is a directory (valid: a file path)"))
    else:
        cases.append((str(a_file), f"argument --report-dir: '{a_file}' is an existing file (valid: a directory"))
    for value, message in cases:
        assert message in _usage_error([*SCAN, option, value, "--gsm8k-dir", data], capsys)


def test_compare_to_missing_or_other_items_fails_before_the_evaluation(tmp_path, capsys, no_model_load) -> None:
    data = str(_gsm8k(tmp_path / "data"))
    missing = tmp_path / "missing.json"
    line = _usage_error([*GSM8K, "--limit", "3", "--compare-to", str(missing), "--gsm8k-dir", data], capsys)
    assert f"--compare-to '{missing}' does not exist" in line
    earlier = tmp_path / "earlier.json"
    earlier.write_text(
        json.dumps(
            {
                "settings": {"task": "harness_gsm8k_bpb", "limit": 5},
                "result": {"per_item": {"bits_per_byte": [1.0] * 5}},
            }
        )
    )
    line = _usage_error([*GSM8K, "--limit", "3", "--compare-to", str(earlier), "--gsm8k-dir", data], capsys)
    assert (
        "is a run of task harness_gsm8k_bpb with --limit 5; this run is task harness_gsm8k_bpb with --limit 3" in line
    )


def test_compare_of_a_json_that_is_not_a_scan(tmp_path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "mxfp4"}))
    line = _usage_error(["compare", str(other), str(other)], capsys)
    assert line == f"error: {other} is not a scan JSON (`scan --output`): missing model, point, layers, summary"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no GSM8K item"),
        (b'{"question": "q"}\n', "test.jsonl:1: malformed GSM8K line (KeyError('answer'))"),
        (b'{"question": "q", "answer": "a"}\n[1, 2]\n', "test.jsonl:2: malformed GSM8K line"),
        (
            b'{"question": "q", "answer": "a"}\n{"question": "\xff"}\n',
            "test.jsonl:2: not valid UTF-8 (byte 14 of the line)",
        ),
    ],
)
@pytest.mark.parametrize("command", [LOSS, GSM8K], ids=["loss", "gsm8k"])
def test_bad_gsm8k_files_are_named_with_the_line(command, content, message, tmp_path, capsys, no_model_load) -> None:
    data = _gsm8k(tmp_path)
    (data / "test.jsonl").write_bytes(content)
    line = _usage_error([*command, "--gsm8k-dir", str(data)], capsys)
    assert str(data) in line and message in line
