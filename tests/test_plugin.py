"""The plugin in a repository that is not this one: a throwaway project with no conftest gates a
tiny model's quantized loss against a stored baseline through the plugin's fixtures alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.baselines import read_baseline_file

ROOT = Path(__file__).resolve().parents[1]

# What a user writes in their own repository: the model under test, GSM8K items, a baseline gate.
USER_TEST = """
import os
from harness.eval.loss import evaluate_loss
from harness.inject import QuantInjector

def test_my_model_under_my_format(model_under_test, loss_items, baseline, metrics):
    m = model_under_test
    with QuantInjector(m.model, os.environ.get("FORMAT", "mxfp8_e4m3"), "weight") as injector:
        s = evaluate_loss(m.model, m.tokenizer, loss_items[:8], injector).summary()
    metrics.record(loss=s["loss"], kl=s["kl"])
    baseline.check(f"w8a16-{m.dtype_id}", {"loss": s["loss"], "kl": s["kl"]})
"""


def test_the_entry_point_is_the_module_name() -> None:
    """``pytest11`` registers the plugin under its module's name, so ``-p harness.pytest_plugin``
    (or this checkout's conftest) next to the installed entry point does not register it twice."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '[project.entry-points.pytest11]\n"harness.pytest_plugin" = "harness.pytest_plugin"\n' in pyproject


def test_a_project_without_conftest_gates_a_tiny_model(pytester: pytest.Pytester, monkeypatch) -> None:
    """Store the baseline once (a missing one: tests/test_baselines.py), pass against it, then fail
    when a change swaps MXFP8 for MXFP4 under the same case id: the KL to the unquantized model
    grows 7.6x on tiny-llama's 8 items (1.49e-5 -> 1.13e-4 nats/token, measured), far beyond
    the 3 % tolerance of ``kl``.  The case id carries the dtype under test: ``--dtype bfloat16``
    stores a ``-bf16`` case under ``cpu-bfloat16`` beside the ``-fp32`` one under ``cpu``."""
    # -p: where the entry point is installed (pip install) it already loaded the plugin and this is a no-op
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p harness.pytest_plugin\n")
    pytester.makepyfile(test_gate=USER_TEST)
    args = ("--harness-model", "tiny-llama")
    stored = pytester.path / "baselines" / "tiny-llama" / "cpu" / f"{pytester.path.name}.json"

    pytester.runpytest_subprocess(*args, "--harness-update-baselines").assert_outcomes(passed=1)
    before = read_baseline_file(stored)[0]["w8a16-fp32"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*harness metrics*", "*test_my_model_under_my_format*"])

    monkeypatch.setenv("FORMAT", "mxfp4")  # the planted regression
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*w8a16-fp32 moved beyond tolerance*", "*kl*REGRESSION*"])
    assert read_baseline_file(stored)[0]["w8a16-fp32"] == before

    pytester.runpytest_subprocess(*args, "--harness-dtype", "bfloat16", "--harness-update-baselines").assert_outcomes(
        passed=1
    )
    bf16 = stored.parent.with_name("cpu-bfloat16") / stored.name
    assert list(read_baseline_file(bf16)[0]) == ["w8a16-bf16"] and list(read_baseline_file(stored)[0]) == ["w8a16-fp32"]
