"""The plugin's options and markers, run in a scratch pytest session (pytester) with no conftest."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\naddopts = --strict-markers -p no:cacheprovider -p harness.pytest_plugin\n")
    pytester.makepyfile(
        test_x="""
import pytest

def test_device(device, pytestconfig):
    opt = pytestconfig.getoption
    print("DEVICE", device, "MODEL", opt("--harness-model"), opt("--harness-update-baselines"))

@pytest.mark.gpu
def test_needs_gpu():
    pass

def test_metric(metrics):
    metrics.record(sqnr_db=17.5)
"""
    )
    return pytester


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_gpu_without_cuda_is_a_usage_error(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("--harness-gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--harness-gpu was given but no CUDA device is visible*"])


def test_defaults_run_on_cpu_and_skip_gpu_cases(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-s", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*DEVICE cpu MODEL smollm2-135m False*", "*needs CUDA: run with --harness-gpu*"])


def test_model_and_update_baselines_are_accepted(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-s", "--harness-model", "tiny-llama", "--harness-update-baselines")
    result.stdout.fnmatch_lines(["*MODEL tiny-llama True*"])


def test_recorded_metrics_are_printed_as_a_table(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess()
    result.stdout.fnmatch_lines(["*harness metrics*", "*test_metric*17.5*"])


def test_unknown_marker_is_an_error(project: pytest.Pytester) -> None:
    project.makepyfile(test_y="import pytest\n@pytest.mark.mxfp9\ndef test_z():\n    pass\n")
    result = project.runpytest_subprocess("test_y.py")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*'mxfp9' not found in `markers`*"])
