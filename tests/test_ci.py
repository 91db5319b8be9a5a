"""The nightly GPU workflow and the scripts behind it: the workflow parses, runs on a schedule and
by hand on a self-hosted GPU runner, and every script it (or a script it runs) calls exists, is
executable and is valid bash; the CPU entry point runs the README's test command, and every
harness command the README shows is one the CLI accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "ci" / "nightly-gpu.yml"
SCRIPT = re.compile(r"\b(?:bash\s+)?((?:\.ci|ci)/[\w./-]+\.sh|\.ci/run)\b")


def scripts_called(text: str) -> set[str]:
    return set(SCRIPT.findall(text))


def test_workflow_triggers_runner_and_artifacts() -> None:
    doc = yaml.safe_load(WORKFLOW.read_text())
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    job = next(iter(doc["jobs"].values()))
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/cache") for u in uses) and any(
        u.startswith("actions/upload-artifact") for u in uses
    )
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "reports/" in upload["with"]["path"] and ".asv/html/" in upload["with"]["path"]


def test_every_script_the_workflow_calls_exists_and_is_valid_bash() -> None:
    job = next(iter(yaml.safe_load(WORKFLOW.read_text())["jobs"].values()))
    pending = set().union(*(scripts_called(step.get("run", "")) for step in job["steps"]))
    assert {"ci/setup.sh", "ci/nightly-gpu.sh"} <= pending
    seen: set[str] = set()
    while pending:  # follow scripts that call scripts
        path = pending.pop()
        seen.add(path)
        script = ROOT / path
        assert script.is_file(), f"{WORKFLOW.name} calls {path}, which does not exist"
        assert script.stat().st_mode & 0o111, f"{path} is not executable"
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{path}: {check.stderr}"
        pending |= scripts_called(script.read_text()) - seen
    assert "ci/asv.sh" in seen


def test_nightly_runs_the_mxfp4_suites_on_gpu_and_the_gsm8k_gate() -> None:
    text = (ROOT / "ci" / "nightly-gpu.sh").read_text()
    assert re.search(r"pytest suites/ -m \"mxfp4[^\"]*\" --gpu --model", text)
    assert re.search(r"pytest suites/gsm8k -m gpu --gpu --model", text)
    assert "asv.sh" in text


def test_ci_entry_point_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\s+#", readme, re.M), "the README's quick start lost its test command"
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_gpu_check_is_valid_bash_and_names_existing_suites() -> None:
    """ci/gpu-check.sh (run by hand on a GPU box, never in CPU CI) parses, is executable, and
    every suite path and benchmark module it names exists."""
    script = ROOT / "ci" / "gpu-check.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    paths = re.findall(r"\bsuites/[\w./]+", text)
    modules = re.findall(r"-m (benchmarks\.\w+)", text)
    assert paths and modules
    assert all((ROOT / p).exists() for p in paths), paths
    assert all((ROOT / (m.replace(".", "/") + ".py")).exists() for m in modules), modules


def readme_harness_commands(text: str) -> list[list[str]]:
    """The arguments of every ``python -m harness ...`` line in the bash blocks of ``text``: line
    continuations joined, ``# comments``, ``[optional]`` groups and ``> file`` redirections dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", " ", line.split(" #", 1)[0]).split(">", 1)[0]
            if (m := re.search(r"python -m harness\b(.*)", line)) and m.group(1).strip():
                commands.append(shlex.split(m.group(1)))
    return commands


def test_the_readme_shows_commands_the_cli_accepts() -> None:
    """Each harness command line of the README parses (subcommand, option names, ``choices``), so a
    newcomer's first copy-paste is not a usage error; the five commands are all there."""
    commands = readme_harness_commands((ROOT / "README.md").read_text())
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README shows a command the CLI rejects: python -m harness {shlex.join(argv)}")
    shown = {" ".join(a[:2]) if a[0] in ("eval", "aqn") else a[0] for a in commands}
    assert {"eval loss", "eval gsm8k", "scan", "aqn preflight", "gate"} <= shown, shown


def test_the_readme_command_check_rejects_a_bad_option() -> None:
    text = "```bash\n.venv/bin/python -m harness scan --model m --formt mxfp4 \\\n    --point weight  # typo\n```\n"
    (argv,) = readme_harness_commands(text)
    assert argv == ["scan", "--model", "m", "--formt", "mxfp4", "--point", "weight"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
