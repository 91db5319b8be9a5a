"""The sweep plan: a TOML file expanded into jobs, validated before any work.

A plan lists ``models`` (tables: ``name`` plus the shared model options of every command:
``dtype``, ``device``, ``device_map``, ``batch_size``, ``gsm8k_dir``, ``trust_remote_code``),
``formats``, ``points``, ``seeds`` and ``jobs`` (tables: ``kind`` — ``eval loss``, ``eval gsm8k``,
``scan``, ``aqn preflight`` — any option of that subcommand under its long name with ``_`` for
``-``, the resources ``num_cpus``/``num_gpus`` of its Ray task, and ``formats``/``points``/``seeds``
overriding the plan's).  Every (model, format, point, job, seed) is one job: the argument list of
the subcommand, parsed by the CLI's own parser here, so a bad value is refused with argparse's
message (the option and its valid choices) before anything runs.  ``items_per_task`` splits
``eval loss`` jobs into item shards (the only kind whose per-item values are independent of the
other items).  A format entry is a format name or a table ``{format = NAME}`` (tables leave room
for more keys, such as a recipe).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class PlanError(ValueError):
    """A plan that cannot run: names the bad key and the valid choices."""


class JobKind(str, Enum):
    EVAL_LOSS = "eval loss"
    EVAL_GSM8K = "eval gsm8k"
    SCAN = "scan"
    AQN_PREFLIGHT = "aqn preflight"


KINDS = [k.value for k in JobKind]
TOP_KEYS = ("models", "formats", "points", "seeds", "jobs", "items_per_task", "max_retries")
FORMAT_KEYS = ("format",)
# Job keys that are not subcommand options.
JOB_KEYS = ("kind", "num_cpus", "num_gpus", "formats", "points", "seeds")
# Options the sweep sets itself (from the matrix, or where it stores the document).
SET_BY_SWEEP = ("model", "format", "point", "seed", "first_item", "output", "json", "report_dir", "compare_to")
MODEL_ONLY = ("dtype", "device", "device_map", "max_memory", "batch_size", "gsm8k_dir", "trust_remote_code")
# The option that counts the items of a shardable kind.
SHARDED_BY = {JobKind.EVAL_LOSS: "items"}
MAX_RETRIES = 2


@dataclass(frozen=True)
class Job:
    """One (model, format, point, job, seed): the subcommand's argument list and its task's resources.

    ``shards``: ``(first_item, items)`` per shard task, empty when the job runs as one task."""

    kind: JobKind
    model: str
    format: str
    point: str
    seed: int | None
    argv: tuple[str, ...]
    num_cpus: float
    num_gpus: float
    shards: tuple[tuple[int, int], ...] = ()

    @property
    def key(self) -> str:
        """``model/format/point/kind[/seedN]``: what pairs the jobs of two sweeps."""
        from harness.models import model_key

        name = f"{model_key(self.model)}/{self.format}/{self.point}/{self.kind.value.replace(' ', '-')}"
        return name if self.seed is None else f"{name}/seed{self.seed}"

    def shard_argv(self, first: int, items: int) -> tuple[str, ...]:
        return (*self.argv, "--first-item", str(first), "--items", str(items))


@dataclass(frozen=True)
class Plan:
    path: Path
    jobs: tuple[Job, ...]
    max_retries: int


def _subparser(kind: JobKind) -> argparse.ArgumentParser:
    from harness.cli import build_parser

    parser = build_parser()
    for word in kind.value.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def options(kind: JobKind) -> dict[str, argparse.Action]:
    """The subcommand's options by destination (``eval_items`` for ``--eval-items``)."""
    return {a.dest: a for a in _subparser(kind)._actions if a.option_strings and a.dest != "help"}


def _device_syntax(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, not checked against this machine's devices."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid devices: cpu, cuda, cuda:N")
    return text


def _devices_anywhere(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest == "device":
            action.type = _device_syntax
        elif isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _devices_anywhere(sub)


def parse(argv: Sequence[str], where: str = "", *, devices_here: bool = False) -> argparse.Namespace:
    """The CLI parser's namespace for ``argv``; its error (option and valid choices) as a PlanError.
    ``devices_here``: check ``--device`` against this machine's devices (in the task that runs the
    job; the driver, which may have no GPU, checks the spelling only)."""
    from harness.cli import build_parser

    parser = build_parser()
    if not devices_here:
        _devices_anywhere(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(argv))
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise PlanError(f"{where}: {message}") from None


def _to_argv(values: dict, actions: dict[str, argparse.Action], where: str) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        action = actions[key]
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise PlanError(f"{where}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (list, dict)):
            raise PlanError(f"{where}: {key} must be a single value, got {value!r}")
        else:
            argv += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _unknown(table: dict, valid: Sequence[str], where: str) -> None:
    bad = [k for k in table if k not in valid]
    if bad:
        raise PlanError(f"{where}: unknown key {bad[0]!r} (valid: {', '.join(valid)})")


def _list(table: dict, key: str, where: str, kind: type, default: list | None = None) -> list:
    value = table.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
        raise PlanError(f"{where}: {key} must be a non-empty list of {kind.__name__}, got {value!r}")
    return value


def _formats(entries: list, where: str) -> list[str]:
    names = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            _unknown(entry, FORMAT_KEYS, f"{where}.formats[{i}]")
            entry = entry.get("format")
        if not isinstance(entry, str):
            raise PlanError(f"{where}.formats[{i}]: a format name or {{format = NAME}}, got {entry!r}")
        names.append(entry)
    return names


def _count(table: dict, key: str, minimum: int, default: int | None) -> int | None:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise PlanError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _resource(job: dict, key: str, where: str) -> float:
    value = job.get(key, 1 if key == "num_cpus" else 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise PlanError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _shards(kind: JobKind, ns: argparse.Namespace, items_per_task: int | None, where: str) -> tuple:
    count_key = SHARDED_BY.get(kind)
    if items_per_task is None or count_key is None or getattr(ns, count_key) <= items_per_task:
        return ()
    if items_per_task % ns.batch_size:
        raise PlanError(
            f"{where}: items_per_task {items_per_task} must be a multiple of batch_size {ns.batch_size} "
            "(shards then batch the items as one task would, so per-item values are identical)"
        )
    total = getattr(ns, count_key)
    return tuple((first, min(items_per_task, total - first)) for first in range(0, total, items_per_task))


def load_plan(path: str | Path) -> Plan:
    """The plan at ``path``, every job's arguments parsed and checked; PlanError on the first bad key."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PlanError(f"{path}: not a readable TOML plan ({err})") from None
    _unknown(doc, TOP_KEYS, str(path))
    models = doc.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise PlanError(f"{path}: models must be a non-empty array of tables ([[models]] with name = ...)")
    formats = _formats(_list(doc, "formats", str(path), object), "plan")
    points = _list(doc, "points", str(path), str, ["weight"])
    seeds = _list(doc, "seeds", str(path), int, [0])
    items_per_task = _count(doc, "items_per_task", 1, None)
    max_retries = _count(doc, "max_retries", 0, MAX_RETRIES)
    job_tables = doc.get("jobs")
    if not isinstance(job_tables, list) or not job_tables or not all(isinstance(j, dict) for j in job_tables):
        raise PlanError(f"{path}: jobs must be a non-empty array of tables ([[jobs]] with kind = ...)")
    jobs: list[Job] = []
    for m, model in enumerate(models):
        model_where = f"models[{m}]"
        _unknown(model, ("name", *MODEL_ONLY), model_where)
        if not isinstance(model.get("name"), str):
            raise PlanError(f"{model_where}: name (an embedded model or a local HF directory) is required")
        for j, table in enumerate(job_tables):
            jobs += _expand(table, f"jobs[{j}]", model, formats, points, seeds, items_per_task)
    keys = [job.key for job in jobs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise PlanError(f"{path}: the plan names job {twice[0]} more than once (two models with one name?)")
    return Plan(path, tuple(jobs), max_retries)


def _expand(table, where, model, formats, points, seeds, items_per_task) -> list[Job]:
    kind_name = table.get("kind")
    if kind_name not in KINDS:
        raise PlanError(f"{where}: kind {kind_name!r} is not a job kind (valid: {', '.join(KINDS)})")
    kind = JobKind(kind_name)
    where = f"{where} ({kind.value})"
    actions = options(kind)
    own = [k for k in actions if k not in SET_BY_SWEEP and k not in MODEL_ONLY]
    _unknown(table, (*JOB_KEYS, *own), where)
    job_opts = {k: v for k, v in table.items() if k not in JOB_KEYS}
    model_opts = {k: v for k, v in model.items() if k != "name"}
    base = [*kind.value.split(), "--model", model["name"]]
    base += _to_argv(model_opts, actions, f"{where}, model {model['name']}")
    base += _to_argv(job_opts, actions, where)
    resources = _resource(table, "num_cpus", where), _resource(table, "num_gpus", where)
    formats = _formats(table["formats"], where) if "formats" in table else formats
    points = _list(table, "points", where, str) if "points" in table else points
    seeds = _list(table, "seeds", where, int) if "seeds" in table else seeds
    jobs = []
    for fmt in formats:
        for point in points:
            for seed in seeds if "seed" in actions else [None]:
                argv = [*base, "--format", fmt, "--point", point]
                argv += [] if seed is None else ["--seed", str(seed)]
                ns = parse(argv, f"{where}, format {fmt}, point {point}")
                if str(ns.device).startswith("cuda") and resources[1] == 0:
                    raise PlanError(f"{where}: device {ns.device} needs num_gpus >= 1 (the GPUs Ray gives the task)")
                shards = _shards(kind, ns, items_per_task, where)
                jobs.append(Job(kind, model["name"], fmt, point, seed, tuple(argv), *resources, shards))
    return jobs
