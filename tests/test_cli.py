from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.formats import list_formats


def test_formats_lists_every_registered_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in list_formats():
        assert name in out
    assert "4.25" in out  # mxfp4 bits per element


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def _gsm8k(tmp_path) -> str:
    lines = [
        json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
        for i in range(4)
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path)


def test_eval_loss_json_has_the_documented_keys(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "eval",
        "loss",
        "--model",
        "tiny-llama",
        "--format",
        "mxfp4",
        "--items",
        "4",
        "--gsm8k-dir",
        _gsm8k(tmp_path),
    ]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"reference_loss", "loss", "kl", "top1_agree", "n", "p_value"} <= out.keys()
    assert out["n"] == 4 and out["modules"] == 14 and out["kl"] > 0
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "underpowered (n < 30)" in text


def test_eval_loss_bad_input_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "loss", "--model", str(tmp_path / "nope"), "--format", "mxfp4", "--gsm8k-dir", _gsm8k(tmp_path)])
    assert exc.value.code == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "loss", "--format", "mxfp5"])
    assert "invalid choice: 'mxfp5'" in capsys.readouterr().err
