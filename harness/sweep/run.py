"""The sweep driver: every unfinished job (or item shard) of a plan as one Ray task.

Ray schedules; the harness only submits, waits and stores.  Without an address a local Ray
instance starts in-process (``ray.init``); ``address="auto"`` or ``HOST:PORT`` joins a running
cluster (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the others, e.g.
from a Slurm allocation).  A task whose worker process dies is retried by Ray up to
``max_retries`` times; a task that raises, or dies on every attempt, is recorded as failed with
its error, and the other jobs go on.  Each result is stored the moment it arrives, so an
interrupted sweep (Ctrl-C, a killed driver) keeps every finished document and the next run of the
same plan resumes with what is missing.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.sweep import tasks
from harness.sweep.plan import Job, Plan
from harness.sweep.store import DONE, FAILED, PENDING, Store, definition, digest, read_json, write_json


@dataclass
class _Entry:
    """A job of the plan, its hash and, when sharded, its shards' hashes."""

    job: Job
    hash: str
    defn: dict
    shards: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    status: str = PENDING
    error: str | None = None

    def row(self) -> dict:
        j = self.job
        return {
            "key": j.key,
            "kind": j.kind.value,
            "model": j.model,
            "format": j.format,
            "point": j.point,
            "seed": j.seed,
            "hash": self.hash,
            "document": f"jobs/{self.hash}.json",
            "status": self.status,
            "error": self.error,
        }


@dataclass(frozen=True)
class SweepOutcome:
    """What one run of a plan did: jobs found finished, run now, and failed (key -> error)."""

    skipped: int
    ran: int
    failed: dict[str, str]
    out: Path


def _error_text(err: BaseException) -> str:
    """The last line of a task's error (Ray wraps the worker's traceback in its message)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _entries(plan: Plan, store: Store) -> list[_Entry]:
    entries = []
    for job in plan.jobs:
        defn = definition(job)
        entry = _Entry(job, digest(defn), defn)
        if store.done(entry.hash):
            entry.status = DONE
        for first, items in job.shards:
            shard_defn = definition(job, job.shard_argv(first, items), (first, items))
            entry.shards.append((digest(shard_defn), (first, items)))
        entries.append(entry)
    return entries


def run_sweep(
    plan: Plan,
    out: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    execute: Callable[[dict], dict] = tasks.execute,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run every job of ``plan`` not yet finished under ``out``; see the module docstring.

    ``execute`` is what a task calls (:func:`harness.sweep.tasks.execute`); Ray is started here
    unless it already is (then it is left running)."""
    store = Store(out)
    entries = _entries(plan, store)
    skipped = sum(e.status == DONE for e in entries)
    todo = [e for e in entries if e.status != DONE]
    store.write_manifest(plan.path, [e.row() for e in entries])
    if not todo:
        log(f"nothing to do: all {len(entries)} jobs of {plan.path} are finished in {store.root}")
        return SweepOutcome(skipped, 0, {}, store.root)
    log(f"{len(todo)} of {len(entries)} jobs to run ({skipped} finished before)")
    import ray

    owns = not ray.is_initialized()
    if owns:
        local = {"num_cpus": num_cpus, "include_dashboard": False} if address is None else {}
        ray.init(address=address, log_to_driver=False, **local)
    try:
        _run(ray, plan, store, todo, execute, log)
    finally:
        store.write_manifest(plan.path, [e.row() for e in entries])
        if owns:
            ray.shutdown()
    failed = {e.job.key: e.error or "" for e in todo if e.status == FAILED}
    return SweepOutcome(skipped, len(todo) - len(failed), failed, store.root)


def _run(ray, plan: Plan, store: Store, todo: list[_Entry], execute, log) -> None:
    remote = ray.remote(execute)
    pending: dict = {}  # ObjectRef -> (entry, shard hash or None, submit time)
    for entry in todo:
        job = entry.job
        opts = {"num_cpus": job.num_cpus, "num_gpus": job.num_gpus, "max_retries": plan.max_retries}
        units = [(h, job.shard_argv(*s)) for h, s in entry.shards if not store.shard(h).is_file()]
        if not entry.shards:
            units = [(None, job.argv)]
        elif not units:  # every shard finished, the merge had not been written
            _finish(store, entry, log)
            continue
        for shard_hash, argv in units:
            task = {"kind": job.kind.value, "argv": list(argv), "shard": shard_hash is not None}
            ref = remote.options(**opts, name=job.key).remote(task)
            pending[ref] = (entry, shard_hash, time.monotonic())
    try:
        _collect(ray, store, pending, log)
    except KeyboardInterrupt:  # stop the tasks still running; what is stored stays
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _collect(ray, store: Store, pending: dict, log) -> None:
    """Store each result as it arrives (``pending`` empties as they do)."""
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        entry, shard_hash, started = pending.pop(ref)
        try:
            result = ray.get(ref)
        except Exception as err:  # the task raised, or its worker died on every attempt
            if entry.status == FAILED:  # another shard of this job failed before
                continue
            entry.status, entry.error = FAILED, _error_text(err)
            _write_meta(store, entry, detail="".join(traceback.format_exception_only(type(err), err)))
            log(f"FAILED {entry.job.key}: {entry.error}")
            continue
        if shard_hash is None:
            write_json(store.document(entry.hash), result["document"])
            entry.status = DONE
            _write_meta(store, entry, rc=result.get("rc", 0), seconds=time.monotonic() - started)
            log(f"done {entry.job.key} ({time.monotonic() - started:.1f} s)")
        else:
            write_json(store.shard(shard_hash), result)  # kept for the next run even if a sibling failed
            if entry.status != FAILED and all(store.shard(h).is_file() for h, _ in entry.shards):
                _finish(store, entry, log)


def _finish(store: Store, entry: _Entry, log) -> None:
    """A sharded job's document from its stored shards, in item order."""
    shards = [read_json(store.shard(h)) for h, _ in entry.shards]
    write_json(store.document(entry.hash), tasks.merge_shards(shards))
    entry.status = DONE
    _write_meta(store, entry, rc=0)
    log(f"done {entry.job.key} ({len(shards)} shards)")


def _write_meta(store: Store, entry: _Entry, **extra: object) -> None:
    shards = [{"hash": h, "first_item": s[0], "items": s[1]} for h, s in entry.shards]
    meta = {**entry.row(), "definition": entry.defn, "argv": list(entry.job.argv), "shards": shards, **extra}
    write_json(store.meta(entry.hash), meta)


def main(plan_path: str, out: str, *, address: str | None = None, num_cpus: int | None = None) -> int:
    """``python -m harness sweep PLAN --out DIR``: run, then write the report; 1 when a job
    failed (each named), 130 on Ctrl-C (finished documents kept: run it again to resume)."""
    from harness.sweep.plan import load_plan
    from harness.sweep.report import write_report

    plan = load_plan(plan_path)
    try:
        outcome = run_sweep(plan, out, address=address, num_cpus=num_cpus)
    except KeyboardInterrupt:
        print(f"interrupted: the finished documents in {out} are kept; run the same command to resume")
        return 130
    for path in write_report(out):
        print(f"wrote {path}")
    for key, error in outcome.failed.items():
        print(f"failed: {key}: {error}")
    if outcome.failed:
        print(f"{len(outcome.failed)} job(s) failed; the others are done (details in {out}/jobs/*.meta.json)")
        return 1
    return 0
