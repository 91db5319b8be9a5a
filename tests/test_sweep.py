"""``harness sweep`` on one local Ray instance with 2 CPUs (started once for the module).

The plan tiny-llama x {mxfp4, nvfp4} x {weight, both} x {eval loss, scan} must give the documents
of the same commands run one by one; a second run does nothing; a killed driver's sweep resumes
to the same documents; a worker that dies is retried; a bad model fails alone; item shards give
the unsharded per-item values; ``gate --sweep`` exits 1 on a planted regression, 0 on a re-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from harness import cli
from harness.sweep import report, tasks
from harness.sweep.plan import PlanError, load_plan
from harness.sweep.run import main as sweep_main
from harness.sweep.run import run_sweep
from harness.sweep.store import Store
from harness.threads import one_thread

PLAN = """
formats = ["mxfp4", "nvfp4"]
points = ["weight", "both"]
max_retries = 1

[[models]]
name = "tiny-llama"

[[jobs]]
kind = "eval loss"
items = 6

[[jobs]]
kind = "scan"
prompts = 2
eval_items = 0
"""


def _plan(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _documents(out: Path) -> dict[str, dict]:
    """key -> document, without the fields that vary: the scan's wall-clock timings and the
    time a per-item document was written."""
    docs = {}
    for row in Store(out).manifest()["jobs"]:
        doc = json.loads((out / row["document"]).read_text())
        doc.pop("timings_s", None)
        doc.get("provenance", {}).pop("created", None)
        docs[row["key"]] = doc
    return docs


def _one_thread():
    """torch on one thread, as in a Ray task of num_cpus 1 (Ray sets OMP_NUM_THREADS to it): CPU
    reductions, hence the last bits of a loss, depend on the thread count."""
    return one_thread()


def _compare_with_commands(jobs, got: dict, tmp_path: Path, capsys) -> None:
    """Each job's document equals its command's, run in this process."""
    for job in jobs:
        if job.kind.value == "eval loss":
            capsys.readouterr()
            assert cli.main([*job.argv, "--json"]) == 0
            want = json.loads(capsys.readouterr().out)
            want["provenance"].pop("created")  # as _documents does
        else:
            assert cli.main([*job.argv, "--output", str(tmp_path / "scan.json")]) == 0
            want = json.loads((tmp_path / "scan.json").read_text())
            want.pop("timings_s")
        assert got[job.key] == want, job.key


@pytest.fixture(scope="module")
def ray_address():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def first_sweep(ray_address, tmp_path_factory) -> tuple[Path, Path]:
    """(plan, folder) of the 8-job plan, run once."""
    tmp = tmp_path_factory.mktemp("sweep")
    plan = _plan(tmp, PLAN)
    outcome = run_sweep(load_plan(plan), tmp / "out")
    assert (outcome.ran, outcome.skipped, outcome.failed) == (8, 0, {})
    return plan, tmp / "out"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp4']\nvolume = 3\n[[jobs]]\nkind = 'scan'", "'volume'"),
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'eval los'", "eval loss, eval gsm8k"),
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp9']\n[[jobs]]\nkind = 'scan'", "invalid choice: 'mxfp9'"),
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'scan'\nitems = 3", "prompts"),
        ("models = [{name = 'tiny-llama', colour = 1}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'scan'", "dtype"),
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp4']\npoints = ['top']\n[[jobs]]\nkind = 'scan'", "weight"),
        (
            "items_per_task = 3\nmodels = [{name = 'tiny-llama', batch_size = 2}]\nformats = ['mxfp4']\n"
            "[[jobs]]\nkind = 'eval loss'\nitems = 8",
            "multiple of batch_size 2",
        ),
        ("models = [{name = 'tiny-llama'}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'scan'\nprompts = 0", "--prompts"),
        ("models = [{name = 'tiny-llama', device = 'cuda'}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'scan'", "num_gpus"),
        ("models = [{name = 'tiny-llama', device = 'tpu'}]\nformats = ['mxfp4']\n[[jobs]]\nkind = 'scan'", "cpu, cuda"),
    ],
)
def test_bad_plans_are_refused_naming_the_key_and_the_choices(tmp_path, text, message):
    with pytest.raises(PlanError, match=message.replace("[", r"\[")):
        load_plan(_plan(tmp_path, text))


def test_jobs_are_the_cli_commands_and_a_second_run_does_nothing(first_sweep, tmp_path, capsys):
    plan, out = first_sweep
    jobs = load_plan(plan).jobs
    assert len(jobs) == 8
    got = _documents(out)
    with _one_thread():
        _compare_with_commands(jobs, got, tmp_path, capsys)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    again = run_sweep(load_plan(plan), out)
    assert (again.ran, again.skipped) == (0, 8)
    assert {p: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == mtimes
    paths = report.write_report(out)
    assert [p.name for p in paths] == ["summary.md", "heatmap.png"]
    summary = paths[0].read_text()
    assert "8 of 8 jobs finished" in summary and "loss increase +" in summary


def test_a_killed_driver_resumes_to_the_same_documents(first_sweep, ray_address, tmp_path):
    plan, reference = first_sweep
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(plan), "--out", str(out), "--address", ray_address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300  # generous: the machine may be loaded
    while not list((out / "jobs").glob("*.meta.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = len(list((out / "jobs").glob("*.meta.json")))
    assert 0 < finished < 8  # killed midway
    outcome = run_sweep(load_plan(plan), out)
    assert (outcome.skipped, outcome.ran, outcome.failed) == (finished, 8 - finished, {})
    assert _documents(out) == _documents(reference)
    # an unchanged re-run passes the gate job by job
    assert cli.main(["gate", "--sweep", str(reference), str(out)]) == 0


def test_a_dying_worker_is_retried_and_a_bad_model_fails_alone(first_sweep, tmp_path, capsys):
    _, reference = first_sweep
    marker = tmp_path / "died-once"

    def dies_on_first_attempt(task: dict) -> dict:
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return tasks.execute(task)

    one = PLAN.split('[[jobs]]\nkind = "scan"')[0].replace('["mxfp4", "nvfp4"]', '["nvfp4"]')
    one = one.replace('["weight", "both"]', '["both"]')
    outcome = run_sweep(load_plan(_plan(tmp_path, one)), tmp_path / "retry", execute=dies_on_first_attempt)
    assert marker.exists() and outcome.failed == {}
    key = "tiny-llama/nvfp4/both/eval-loss/seed0"
    assert _documents(tmp_path / "retry")[key] == _documents(reference)[key]

    bad = one.replace(
        '[[models]]\nname = "tiny-llama"',
        f'[[models]]\nname = "tiny-llama"\n\n[[models]]\nname = "{tmp_path}/no-model"',
    )
    capsys.readouterr()
    assert sweep_main(str(_plan(tmp_path, bad, "bad.toml")), str(tmp_path / "bad")) == 1
    printed = capsys.readouterr().out
    assert "failed: no-model/nvfp4/both/eval-loss/seed0: " in printed and "no-model" in printed.split("failed: ")[1]
    rows = {r["key"]: r for r in Store(tmp_path / "bad").manifest()["jobs"]}
    assert rows[key]["status"] == "done" and rows["no-model/nvfp4/both/eval-loss/seed0"]["status"] == "failed"
    assert "1 of 2 jobs finished" in (tmp_path / "bad" / "summary.md").read_text()


def test_item_shards_give_the_unsharded_per_item_values(ray_address, tmp_path, capsys):
    plan = _plan(
        tmp_path,
        'items_per_task = 4\nformats = ["mxfp4"]\npoints = ["both"]\n[[models]]\nname = "tiny-llama"\nbatch_size = 2\n'
        '[[jobs]]\nkind = "eval loss"\nitems = 8\n',
    )
    [job] = load_plan(plan).jobs
    assert job.shards == ((0, 4), (4, 4))
    assert run_sweep(load_plan(plan), tmp_path / "out").failed == {}
    assert len(list((tmp_path / "out" / "shards").glob("*.json"))) == 2
    capsys.readouterr()
    with _one_thread():
        assert cli.main([*job.argv, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    sharded = _documents(tmp_path / "out")[job.key]
    assert sharded["per_item"] == whole["per_item"]
    whole["provenance"].pop("created")  # as _documents does
    assert sharded == whole


def test_gate_sweep_exits_1_on_a_planted_regression(first_sweep, tmp_path, capsys):
    _, old = first_sweep
    new = tmp_path / "new"
    shutil.copytree(old, new)
    row = next(r for r in Store(new).manifest()["jobs"] if r["kind"] == "eval loss")
    doc_path = new / row["document"]
    doc = json.loads(doc_path.read_text())
    doc["per_item"]["loss"] = [v + 0.5 + 0.01 * i for i, v in enumerate(doc["per_item"]["loss"])]
    doc_path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["gate", "--sweep", str(old), str(new)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert [line.split(": ")[2] for line in lines if line.startswith(row["key"])] == ["REGRESSION"]
    assert sum("PASS" in line for line in lines) == 3 and sum("not gated" in line for line in lines) == 4


def test_ctrl_c_keeps_the_finished_documents_and_the_next_run_completes(first_sweep, tmp_path):
    _, reference = first_sweep
    two = PLAN.replace('["mxfp4", "nvfp4"]', '["nvfp4"]').replace('["weight", "both"]', '["both"]')
    plan = load_plan(_plan(tmp_path, two))

    def ctrl_c_after_the_first_document(line: str) -> None:
        if line.startswith("done "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path / "out", log=ctrl_c_after_the_first_document)
    assert len(list((tmp_path / "out" / "jobs").glob("*.meta.json"))) == 1
    outcome = run_sweep(plan, tmp_path / "out")
    assert (outcome.skipped, outcome.ran) == (1, 1)
    want = _documents(reference)
    assert _documents(tmp_path / "out") == {k: want[k] for k in _documents(tmp_path / "out")}


def test_a_task_sees_only_the_gpus_ray_assigned(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    tasks.check_gpus()  # CUDA_VISIBLE_DEVICES=3: one device, cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(RuntimeError, match=r"assigned GPUs \[3\] but CUDA shows 8"):
        tasks.check_gpus()
