from __future__ import annotations

import json

import pytest

from harness.cli import build_parser, main
from harness.formats import list_formats
from harness.gsm8k import CALIBRATION_ITEMS


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
    for split in ("test", "train"):  # the lm-eval tasks name both splits' files
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
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
    out = json.loads(capsys.readouterr().out)  # a per-item document (harness.peritem)
    agg, recipe = out["aggregate"], out["recipe"]
    assert {"reference_loss", "loss", "kl", "top1_agree", "n", "p_value"} <= agg.keys()
    assert agg["n"] == 4 and recipe["modules"] == 14 and agg["kl"] > 0 and recipe["scale_mode"] == "floor"
    per_item = out["per_item"]  # what `python -m harness gate` reads
    assert set(per_item) == {"reference_loss", "loss", "kl", "top1_agree"} and all(
        len(v) == 4 for v in per_item.values()
    )
    assert sum(per_item["kl"]) > 0 and all(0 <= x <= 1 for x in per_item["top1_agree"])
    assert main([*argv, "--json", "--scale-mode", "ceil"]) == 0
    ceil = json.loads(capsys.readouterr().out)
    assert ceil["recipe"]["scale_mode"] == "ceil" and ceil["aggregate"]["loss"] != agg["loss"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "underpowered (n < 30; MDE " in text and "at 80 % power)" in text


def test_eval_loss_bad_input_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        argv = ["eval", "loss", "--model", str(tmp_path / "nope"), "--format", "mxfp4", "--items", "4"]
        main([*argv, "--gsm8k-dir", _gsm8k(tmp_path)])
    assert exc.value.code == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "loss", "--format", "mxfp5"])
    assert "invalid choice: 'mxfp5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "loss", "--format", "mxfp4", "--scale-mode", "round"])
    assert "invalid choice: 'round' (choose from 'floor', 'ceil', 'even', 'rceil')" in capsys.readouterr().err


def test_aqn_preflight_and_compare_on_a_tiny_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _gsm8k(tmp_path)
    (tmp_path / "train.jsonl").write_text((tmp_path / "test.jsonl").read_text())
    assert (
        main(
            [
                "aqn",
                "preflight",
                "--model",
                "tiny-llama",
                "--config",
                "1D",
                "--items",
                "2",
                "--gsm8k-dir",
                data,
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        out["verdict"] in ("ok", "borderline", "risky", "collapse") and out["targets"] == 14 and out["config"] == "1D"
    )
    assert (
        len(out["draws"]) == 8
        and out["loss_increase"]["low"] <= out["loss_increase"]["mean"] <= out["loss_increase"]["high"]
    )
    with pytest.raises(SystemExit):
        main(["aqn", "preflight", "--model", "tiny-llama", "--config", "broken-sigma-end-0", "--gsm8k-dir", data])
    assert "sigma_end must be > 0" in capsys.readouterr().err
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"sigma_start": 0.01, "sigma_end": 0.0001, "num_stages": 3}))
    report = tmp_path / "aqn.md"
    assert (
        main(
            [
                "aqn",
                "compare",
                "--model",
                "tiny-llama",
                "--config",
                str(config),
                "--strategies",
                "none,global",
                "--seeds",
                "2",
                "--steps",
                "3",
                "--train-items",
                "4",
                "--eval-items",
                "4",
                "--gsm8k-dir",
                data,
                "--output",
                str(report),
            ]
        )
        == 0
    )
    text = report.read_text()
    assert "| none" in text and "| global" in text and "| unquantized" in text and "vs no AQN" in text
    assert "not QeRL's RL" in text and "the seed is the unit" in text
    doc = json.loads(report.with_suffix(".json").read_text())
    assert doc["seeds"] == [0, 1] and len(doc["per_seed_loss"]["unquantized"]) == 2
    with pytest.raises(SystemExit):
        main(["aqn", "compare", "--model", "tiny-llama", "--strategies", "none,targeted", "--gsm8k-dir", data])
    assert "need --attribution SCAN.json" in capsys.readouterr().err


def test_eval_gsm8k_bpb_runs_compares_and_saves(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    argv = ["eval", "gsm8k", "--task", "gsm8k_bpb", "--model", "tiny-llama", "--format", "mxfp4", "--limit", "4"]
    argv += ["--gsm8k-dir", _gsm8k(tmp_path), "--tasks-dir", str(tmp_path / "tasks")]
    assert main([*argv, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits_per_byte" in text and "mxfp4 against reference (paired, same items; means of per-item values)" in text
    doc = json.loads(out.read_text())  # a per-item document (harness.peritem)
    assert doc["recipe"]["task"] == "harness_gsm8k_bpb" and set(doc["details"]["runs"]) == {"reference", "mxfp4"}
    assert len(doc["per_item"]["bits_per_byte,none"]) == 4 and doc["item_ids"] == [0, 1, 2, 3]
    assert doc["details"]["comparisons"]["reference"]["bits_per_byte,none"]["underpowered"]
    assert (tmp_path / "tasks" / "harness_gsm8k_bpb.yaml").is_file()  # kept for lm_eval --include_path
    # the same configuration again, against the saved run: identical per-item values
    assert main([*argv, "--no-reference", "--compare-to", str(out)]) == 0
    assert "+0.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--compare-to", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "missing.json: cannot read it" in capsys.readouterr().err


def _subcommands(parser) -> dict[str, object]:
    """Every leaf subcommand's parser, by its path (``aqn compare``)."""
    out = {}
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            out |= {f"{name} {k}".strip(): v for k, v in (_subcommands(sub) if sub._subparsers else {"": sub}).items()}
    return out


def test_every_command_that_loads_a_model_shares_the_model_options() -> None:
    """The same flags, defaults and meaning (``--batch-size``: sequences per evaluation pass;
    training batches are ``--train-batch-size``)."""
    shared = ["--model", "--dtype", "--device", "--batch-size", "--gsm8k-dir", "--trust-remote-code"]
    loaders = {}
    for path, parser in _subcommands(build_parser()).items():
        options = {flag: a for a in parser._actions for flag in a.option_strings}
        if "--model" in options:
            loaders[path] = [(options[f].default, options[f].help) for f in shared if f in options]
            assert all(f in options for f in shared), (path, [f for f in shared if f not in options])
    assert set(loaders) == {"eval loss", "eval gsm8k", "scan", "aqn preflight", "aqn compare"}
    assert len({tuple(v) for v in loaders.values()}) == 1, loaders
    args = build_parser().parse_args(["aqn", "compare", "--batch-size", "3", "--train-batch-size", "2"])
    assert (args.batch_size, args.train_batch_size) == (3, 2)


def test_recipes_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from harness.recipes import list_recipes

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_recipes()) and "two-level" in out


def test_eval_loss_takes_a_weight_format_a_recipe_and_a_static_input(tmp_path, capsys) -> None:
    """--weight-format F --point weight is W-only; --recipe names both sides and the document
    carries them; a static input format calibrates on the train split's items first."""
    data = _gsm8k(tmp_path)
    train = (tmp_path / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(train * (CALIBRATION_ITEMS // 4))  # the calibration prompts
    base = ["eval", "loss", "--model", "tiny-llama", "--items", "4", "--gsm8k-dir", data, "--json"]
    assert main([*base, "--weight-format", "int4_g128", "--point", "weight"]) == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["format"] == "w4a16-int4-g128" and recipe["point"] == "weight" and recipe["input_format"] is None
    assert main([*base, "--recipe", "w8a8-fp8-static", "--transform", "hadamard"]) == 0
    doc = json.loads(capsys.readouterr().out)
    recipe = doc["recipe"]
    assert recipe["format"] == "w8a8-fp8-static+hadamard" and recipe["input_format"] == "fp8_e4m3_tensor"
    assert recipe["point"] == "both" and doc["aggregate"]["kl"] > 0
    for argv, message in (
        ([*base, "--weight-format", "int4_g128", "--recipe", "w4a4-nvfp4"], "--weight-format and --recipe exclude"),
        (base, "name the formats"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
