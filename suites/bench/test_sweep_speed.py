"""Speed of ``harness sweep``, as ratios measured in one run (so machines and loads compare):
the 8-job plan ``examples/sweep-tiny.toml`` run serially in this process (each job through the
same :func:`harness.sweep.tasks.execute` a Ray task calls) against the same plan on a local Ray
instance with 2 workers; and Ray's own cost per task (an empty job), which says how long a job or
an item shard must run before spreading it pays.  Marker ``bench``: not in the default CI run;
``make bench`` runs it.  No timed asserts: the numbers go to the benchmark table."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from harness.sweep import tasks
from harness.sweep.plan import load_plan
from harness.sweep.run import run_sweep

pytestmark = [pytest.mark.bench]

PLAN = Path(__file__).parents[2] / "examples" / "sweep-tiny.toml"
EMPTY_TASKS = 50


def _empty(task: dict) -> dict:
    return {}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_sweep_on_two_ray_workers_against_serial(benchmark, local_ray, metrics, tmp_path) -> None:
    plan = load_plan(PLAN)
    t0 = time.perf_counter()
    for job in plan.jobs:
        tasks.execute({"kind": job.kind.value, "argv": list(job.argv), "shard": False})
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = benchmark.pedantic(run_sweep, args=(plan, tmp_path / "out"), kwargs={"log": lambda _: None}, rounds=1)
    on_ray = time.perf_counter() - t0
    assert outcome.ran == len(plan.jobs) and not outcome.failed
    benchmark.extra_info.update(serial_s=serial, ray_s=on_ray, speedup=serial / on_ray, jobs=len(plan.jobs))
    metrics.record(serial_s=serial, ray_2_workers_s=on_ray, speedup=serial / on_ray)


def test_ray_overhead_per_empty_task(benchmark, local_ray, metrics) -> None:
    remote = ray.remote(_empty)
    ray.get([remote.remote({}) for _ in range(2)])  # workers started
    t0 = time.perf_counter()
    results = benchmark.pedantic(lambda: ray.get([remote.remote({}) for _ in range(EMPTY_TASKS)]), rounds=1)
    per_task = (time.perf_counter() - t0) / EMPTY_TASKS
    assert results == [{}] * EMPTY_TASKS
    benchmark.extra_info.update(per_task_ms=per_task * 1e3, tasks=EMPTY_TASKS)
    metrics.record(per_task_ms=per_task * 1e3)
