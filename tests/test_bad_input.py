"""Bad input: every probe gets a one-line error naming the bad value and the valid
choices, exit code 2, no traceback, and is found before any model is loaded or item evaluated."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gsm8k_folders import tiny_gsm8k

import harness.models
from harness.cli import main
from harness.formats import fake_quantize, nvfp4_per_tensor_scale
from harness.formats.quant import PER_TENSOR_SCALE_MAX, PER_TENSOR_SCALE_MIN


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
        ([*AQN, "--seeds", "0"], "argument --seeds: 0 " + RANGE.format(2)),
        ([*AQN, "--train-items", "0"], "argument --train-items: 0 " + RANGE.format(1)),
        ([*AQN, "--output", "aqn.json"], "error: --output aqn.json: the markdown goes there and the JSON beside it"),
        ([*AQN, "--seeds", "1"], "argument --seeds: 1 " + RANGE.format(2)),
        ([*AQN, "--attribution", "missing.json"], "error: missing.json: not a readable scan JSON"),
        ([*LOSS, "--device", "bogus"], "argument --device: unknown device 'bogus'; valid devices: cpu"),
        ([*LOSS, "--device", "cuda:99"], "argument --device: device 'cuda:99' is not available; valid devices: cpu"),
        (
            [*SCAN, "--attribution", "--eval-items", "0"],
            "error: --attribution needs evaluation items: --eval-items is 0",
        ),
        ([*SCAN, "--instability-runs", "1"], "error: --instability-runs 1 gives no spread (valid: 0 to skip"),
        (
            [*SCAN, "--attribution", "fast"],
            "argument --attribution: invalid choice: 'fast' (choose from 'screen', 'exact', 'none')",
        ),
    ],
)
def test_counts_sizes_and_devices_are_checked_first(argv, message, tmp_path, capsys, no_model_load) -> None:
    line = _usage_error([*argv, "--gsm8k-dir", str(tiny_gsm8k(tmp_path))], capsys)
    assert message in line


@pytest.mark.parametrize("option", ["--output", "--report-dir"])
def test_unusable_outputs_fail_before_the_scan(option: str, tmp_path, capsys, no_model_load) -> None:
    data = str(tiny_gsm8k(tmp_path / "data"))
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
    """--compare-to is read by the per-item document reader: a missing file, a document of other
    items (another data set, or another --limit of this one) or of another task are usage errors."""
    from harness.eval.gsm8k import Gsm8kResult, Gsm8kRuns
    from harness.peritem import dataset_of

    data = str(tiny_gsm8k(tmp_path / "data"))
    missing = tmp_path / "missing.json"
    line = _usage_error([*GSM8K, "--limit", "3", "--compare-to", str(missing), "--gsm8k-dir", data], capsys)
    assert f"--compare-to {missing}: cannot read it (No such file or directory)" in line

    def earlier(texts: list[str], task: str = "gsm8k_bpb") -> str:
        n = len(texts)
        settings = {"task": f"harness_{task}", "limit": n}
        run = Gsm8kResult(task, n, {}, {"bits_per_byte,none": [1.0] * n}, [], {}, settings, list(range(n)))
        doc = Gsm8kRuns("m", "none", "weight", "float32", task, {"reference": run}).document(
            model={}, dataset=dataset_of("gsm8k test", texts)
        )
        path = tmp_path / f"earlier-{task}-{n}.json"
        path.write_text(doc.dumps())
        return str(path)

    texts = [f"Question: What is {i} + {i}?\nAnswer: #### {2 * i}" for i in range(4)]
    argv = [*GSM8K, "--no-reference", "--gsm8k-dir", data]
    line = _usage_error([*argv, "--limit", "3", "--compare-to", earlier(texts[:4])], capsys)
    assert "is not comparable with this run: different data sets: gsm8k test (4 items" in line
    line = _usage_error([*argv, "--limit", "3", "--compare-to", earlier(["other"] * 3)], capsys)
    assert "is not comparable with this run: different data sets" in line
    line = _usage_error([*argv, "--limit", "3", "--compare-to", earlier(texts[:3], "gsm8k")], capsys)
    assert "of task harness_gsm8k; this run is `eval gsm8k` of task harness_gsm8k_bpb" in line
    line = _usage_error([*argv, "--limit", "9"], capsys)
    assert "asked for 9 test items but" in line and "holds 4 (valid: at most 4)" in line


def test_compare_of_a_json_that_is_not_a_scan(tmp_path, capsys) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "mxfp4"}))
    line = _usage_error(["compare", str(other), str(other)], capsys)
    assert line == f"error: {other} is not a scan JSON (`scan --output`): missing schema_version, model, point, layers"


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
    data = tiny_gsm8k(tmp_path)
    (data / "test.jsonl").write_bytes(content)
    line = _usage_error([*command, "--gsm8k-dir", str(data)], capsys)
    assert str(data) in line and message in line


def test_model_directories_without_weights_or_with_a_bad_config_are_named(tmp_path, capsys) -> None:
    data = str(tiny_gsm8k(tmp_path / "data"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"")
    argv = [*LOSS[:2], "--model", str(model), "--format", "mxfp4", "--items", "4", "--gsm8k-dir", data]
    line = _usage_error(argv, capsys)
    assert line == (
        f"error: model '{model}': {model} has no *.safetensors weights (found: config.json, pytorch_model.bin); "
        "the harness loads safetensors only"
    )
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    line = _usage_error(argv, capsys)
    assert line.startswith(f"error: model '{model}': {model / 'config.json'} is not a valid config.json (Expecting")


def test_nvfp4_per_tensor_scale_outside_the_finite_range_is_refused() -> None:
    x = torch.randn(32)
    for bad in (1e-40, PER_TENSOR_SCALE_MIN / 2, PER_TENSOR_SCALE_MAX * 2, 0.0, math.inf):
        with pytest.raises(
            ValueError, match=r"per_tensor_scale must be one finite positive number in \[7\.523e-37, 1\.266e\+35\]"
        ):
            fake_quantize(x, "nvfp4", per_tensor_scale=bad)
    for edge in (PER_TENSOR_SCALE_MIN, PER_TENSOR_SCALE_MAX):  # the range's ends, on data the recipe fits to them
        fitted = x * (edge * 448 * 6 / x.abs().max())
        outs = [fake_quantize(fitted, "nvfp4", per_tensor_scale=edge, backend=b) for b in ("reference", "auto")]
        assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
        assert float((outs[0] - fitted).abs().max() / fitted.abs().max()) <= 1 / 6  # half the top E2M1 step


def test_nvfp4_per_tensor_scale_of_tiny_and_zero_tensors_is_usable() -> None:
    tiny = torch.full((32,), 1e-36)
    p = nvfp4_per_tensor_scale(tiny)
    assert float(p) == PER_TENSOR_SCALE_MIN  # 1e-36 / 2688 is below the range: clamped up
    y = fake_quantize(tiny, "nvfp4", per_tensor_scale=p)
    # one block of equal values: only the E4M3 block scale rounds, by at most half a step (2**-4)
    assert torch.isfinite(y).all() and float(((y - tiny) / tiny).abs().max()) <= 2.0**-4
    zeros = torch.zeros(32)
    assert float(nvfp4_per_tensor_scale(zeros)) == PER_TENSOR_SCALE_MIN
    assert torch.equal(fake_quantize(zeros, "nvfp4", per_tensor_scale=nvfp4_per_tensor_scale(zeros)), zeros)
    x = torch.tensor([math.nan, *range(1, 32)], dtype=torch.float32)
    assert float(nvfp4_per_tensor_scale(x)) == pytest.approx(31 / 2688)  # the finite values' amax


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, no_model_load) -> None:
    line = _usage_error([*LOSS, "--device", "cuda", "--gsm8k-dir", str(tiny_gsm8k(tmp_path))], capsys)
    assert line.endswith(
        "argument --device: device 'cuda' is not available; valid devices: cpu (no CUDA device is visible here)"
    )
