"""The plugin as a guest in someone else's repository: namespaced options beside the
repository's own ``--model``, ``-p no:harness``, a user's own ``device`` fixture, a bad model as
one usage error, a create-command that reproduces the run, one baselines folder per repository,
duplicate case ids refused, every check of a passing test stored (and only of passing ones), the
CPU fallback of a bfloat16 CUDA case, and ``--harness-update-baselines`` under Ctrl-C or a full
disk ending in one line that says what was written."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import harness.pytest_plugin
from harness.baselines import cpu_fallback, read_baseline_file, write_baselines
from harness.models import EMBEDDED, TINY

ROOT = Path(__file__).resolve().parents[1]
INI = "[pytest]\naddopts = -p no:cacheprovider -p harness.pytest_plugin\n"  # -p: a no-op where installed
CHECK = (
    "import os\n"
    "def test_case(baseline):\n"
    "    baseline.check('mxfp4-w4a16-fp32', {'loss': float(os.environ.get('LOSS', '2.30'))})\n"
)


def _stored(project: Path, device: str = "cpu", suite: str = "suite") -> dict:
    return read_baseline_file(project / "baselines" / "smollm2-135m" / device / f"{suite}.json")[0]


def test_a_repository_with_its_own_model_gpu_and_dtype_options_runs(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(
        "def pytest_addoption(parser):\n"
        "    for name in ('--model', '--gpu', '--dtype', '--update-baselines'):\n"
        "        parser.addoption(name, default='theirs')\n"
    )
    pytester.makepyfile(
        test_theirs="def test_mine(pytestconfig):\n    assert pytestconfig.getoption('--model') == 'x'\n"
    )
    result = pytester.runpytest("--model", "x", "--harness-dtype", "bfloat16")
    result.assert_outcomes(passed=1)


def test_dash_p_no_harness_turns_the_plugin_off(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makeconftest('pytest_plugins = ["harness.pytest_plugin"]\n')  # as this repository's own conftest
    pytester.makepyfile(test_b=CHECK)
    result = pytester.runpytest("-p", "no:harness", "--harness-model", "tiny-llama")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --harness-model*"])
    result = pytester.runpytest("-p", "no:harness", "--markers")
    assert "mxfp4:" not in result.stdout.str()
    result = pytester.runpytest("-p", "no:harness")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'baseline' not found*"])


def test_a_users_own_device_fixture_changes_nothing_of_the_plugins(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest("import pytest\n@pytest.fixture\ndef device():\n    return 'cuda:0'\n")
    pytester.mkdir("suite")
    pytester.path.joinpath("suite", "test_b.py").write_text(
        CHECK + "def test_theirs(device):\n    assert device == 'cuda:0'\n"
    )
    pytester.runpytest("--harness-update-baselines").assert_outcomes(passed=2)
    assert _stored(pytester.path) == {"mxfp4-w4a16-fp32": {"loss": 2.30}}


def test_a_model_that_does_not_exist_is_one_usage_error_before_collection(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_m="def test_m(model_under_test):\n    pass\n")
    result = pytester.runpytest("--harness-model", "/no/such/dir")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR")]
    assert errors == [
        "ERROR: --harness-model: model '/no/such/dir': no such directory; pass a local HF model directory or one "
        f"of: {', '.join([*EMBEDDED, *TINY])}"
    ]
    assert "collected" not in result.stdout.str() and "Traceback" not in result.stderr.str()


def test_the_printed_create_command_stores_what_the_failing_run_compares(pytester: pytest.Pytester) -> None:
    """Run with another baselines folder and dtype from a subfolder; the printed command, run
    from elsewhere, stores the case where that run looks, and then it passes."""
    pytester.makeini(INI)
    pytester.mkdir("suite")
    pytester.path.joinpath("suite", "test_b.py").write_text(CHECK)
    (pytester.path / "elsewhere").mkdir()
    args = ("--harness-baselines-dir", "../gates", "--harness-dtype", "bfloat16")
    pytester.chdir()
    os.chdir(pytester.path / "suite")
    result = pytester.runpytest("test_b.py", *args)
    result.assert_outcomes(failed=1)
    command = next(line.strip() for line in result.stdout.lines if line.strip().startswith("pytest "))
    expected = [
        *("pytest", f"{pytester.path}/suite/test_b.py::test_case", "--harness-model", "smollm2-135m"),
        *("--harness-dtype", "bfloat16", "--harness-baselines-dir", str(pytester.path / "gates")),
        "--harness-update-baselines",
    ]
    assert shlex.split(command) == expected
    os.chdir(pytester.path / "elsewhere")
    pytester.runpytest(*shlex.split(command)[1:]).assert_outcomes(passed=1)
    assert read_baseline_file(pytester.path / "gates" / "smollm2-135m" / "cpu-bfloat16" / "suite.json")[0] == {
        "mxfp4-w4a16-fp32": {"loss": 2.30}
    }
    os.chdir(pytester.path / "suite")
    pytester.runpytest("test_b.py", *args).assert_outcomes(passed=1)


def test_without_a_config_file_the_baselines_live_in_the_repository_root(pytester: pytest.Pytester) -> None:
    """No pytest.ini/pyproject.toml: from the repository root or from inside the suite folder,
    one baselines/ at the git root; with no repository either, an error that says what to pass."""
    pytester.mkdir("suite")
    pytester.path.joinpath("suite", "test_b.py").write_text(CHECK)
    flags = ("-p", "no:cacheprovider", "--harness-update-baselines")
    os.chdir(pytester.path / "suite")
    result = pytester.runpytest("test_b.py", *flags)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot tell where the baselines of*pass --harness-baselines-dir*"])
    (pytester.path / ".git").mkdir()
    pytester.runpytest("test_b.py", *flags).assert_outcomes(passed=1)
    os.chdir(pytester.path)
    pytester.runpytest("suite", *flags[:2]).assert_outcomes(passed=1)  # compares with the same file
    assert not (pytester.path / "suite" / "baselines").exists()
    assert _stored(pytester.path) == {"mxfp4-w4a16-fp32": {"loss": 2.30}}


def test_a_case_id_checked_by_two_test_files_of_one_folder_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.mkdir("suite")
    for name, loss in (("test_a.py", 2.30), ("test_b.py", 2.60)):
        body = f"def test_case(baseline):\n    baseline.check('shared-id', {{'loss': {loss}}})\n"
        pytester.path.joinpath("suite", name).write_text(body)
    result = pytester.runpytest("--harness-update-baselines")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*case id 'shared-id' of *suite.json is checked also by suite/test_a.py::test_case*"])
    assert _stored(pytester.path) == {"shared-id": {"loss": 2.30}}


def test_every_check_of_a_passing_test_is_stored_and_only_of_passing_ones(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.mkdir("suite")
    pytester.path.joinpath("suite", "test_b.py").write_text(
        "import pytest\n"
        "def test_two_cases(baseline):\n"
        "    baseline.check('case-a', {'loss': 1.0})\n"
        "    baseline.check('case-b', {'loss': 2.0})\n"
        "def test_same_case_twice(baseline):\n"
        "    baseline.check('case-c', {'loss': 3.0})\n"
        "    baseline.check('case-c', {'loss': 3.5})\n"
        "@pytest.mark.xfail(reason='known bad')\n"
        "def test_xfail(baseline):\n"
        "    baseline.check('xfailed', {'loss': 9.0})\n"
        "    assert False\n"
        "@pytest.mark.xfail(reason='flaky')\n"
        "def test_xpass(baseline):\n"
        "    baseline.check('xpassed', {'loss': 9.0})\n"
        "def test_skipped(baseline):\n"
        "    baseline.check('skipped', {'loss': 9.0})\n"
        "    pytest.skip('not here')\n"
        "def test_failed(baseline):\n"
        "    baseline.check('failed', {'loss': 9.0})\n"
        "    assert False\n"
    )
    result = pytester.runpytest("--harness-update-baselines")
    result.assert_outcomes(passed=1, failed=2, xfailed=1, xpassed=1, skipped=1)
    result.stdout.fnmatch_lines(["*case id 'case-c' of *suite.json is checked twice by this test*"])
    assert _stored(pytester.path) == {"case-a": {"loss": 1.0}, "case-b": {"loss": 2.0}}


def test_a_bfloat16_cuda_case_falls_back_to_the_bfloat16_cpu_baseline(tmp_path: Path) -> None:
    root = tmp_path / "baselines" / "tiny"
    write_baselines(root / "cpu-bfloat16" / "suite.json", {"mxfp4-w4a16-bf16": {"loss": 2.0}})
    write_baselines(root / "cpu" / "suite.json", {"mxfp4-w4a16-fp32": {"loss": 1.0}})
    with pytest.warns(UserWarning, match="compared with .*cpu-bfloat16/suite.json"):
        fallback = cpu_fallback(root / "cuda-bfloat16" / "suite.json", "mxfp4-w4a16-bf16")
    assert fallback is not None and fallback[0] == root / "cpu-bfloat16" / "suite.json"
    assert fallback[1] == {"mxfp4-w4a16-bf16": {"loss": 2.0}}
    assert cpu_fallback(root / "cuda-bfloat16" / "suite.json", "mxfp4-w4a16-fp32") is None  # never across dtypes


def _three_suites(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    for suite in ("s1", "s2", "s3"):
        pytester.mkdir(suite)
        pytester.path.joinpath(suite, f"test_{suite}.py").write_text(
            f"def test_x(baseline):\n    baseline.check('{suite}-case', {{'loss': 1.5}})\n"
        )


def test_ctrl_c_during_the_tests_writes_no_baseline_and_says_so(pytester: pytest.Pytester) -> None:
    _three_suites(pytester)
    pytester.path.joinpath("s3", "test_s3.py").write_text("def test_x(baseline):\n    raise KeyboardInterrupt\n")
    result = pytester.runpytest("--harness-update-baselines", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*interrupted: no baseline was written (2 passed checks of 2 files discarded); rerun with*"]
    )
    assert not (pytester.path / "baselines").exists()


def test_ctrl_c_while_the_baselines_are_written_names_those_written(pytester: pytest.Pytester, monkeypatch) -> None:
    _three_suites(pytester)
    real, calls = harness.pytest_plugin.write_baselines, []

    def interrupted_at_the_second(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, *args)

    monkeypatch.setattr(harness.pytest_plugin, "write_baselines", interrupted_at_the_second)
    result = pytester.runpytest("--harness-update-baselines", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert f"{calls[0]} :: s1-case" in out
    for path in (calls[1], calls[1].with_name("s3.json")):
        assert f"baseline not updated: {path}: not written (interrupted)" in out
    assert [p.name for p in (pytester.path / "baselines" / "smollm2-135m" / "cpu").iterdir()] == ["s1.json"]


def test_a_full_disk_during_the_update_ends_in_one_line_and_keeps_the_file(
    pytester: pytest.Pytester, monkeypatch
) -> None:
    pytester.makeini(INI)
    pytester.mkdir("suite")
    pytester.path.joinpath("suite", "test_b.py").write_text(CHECK)
    stored = pytester.path / "baselines" / "smollm2-135m" / "cpu" / "suite.json"
    write_baselines(stored, {"other": {"loss": 1.0}})
    before = stored.read_bytes()

    def full(self: Path, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    result = pytester.runpytest("--harness-update-baselines")
    monkeypatch.undo()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    lines = [line for line in result.stdout.lines if "not updated" in line]
    assert len(lines) == 1 and "not written (the disk is full" in lines[0] and "unchanged" in lines[0], lines
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert stored.read_bytes() == before


def test_this_repositorys_short_option_commands_keep_working() -> None:
    """`pytest suites/ -m mxfp4 --gpu` and friends: this checkout's conftest opts in to the
    short names (on a CPU machine --gpu is the documented usage error, not an unknown option)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q", "suites/model", "-m", "mxfp4"]
    listed = subprocess.run(
        [*run, "--model", "tiny-llama", "--dtype", "bfloat16", "--gsm8k-limit", "3", "--baselines-dir", "b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    assert " collected" in listed.stdout or "tests collected" in listed.stdout, listed.stdout
    gpu = subprocess.run([*run, "--gpu"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert gpu.returncode == pytest.ExitCode.USAGE_ERROR and "no CUDA device is visible" in gpu.stderr, gpu.stderr
