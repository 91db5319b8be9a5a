"""Stored baselines: ``baselines/<model>/<device>/<suite>.json`` holding
``{case_id: {metric: value}}`` plus provenance and the identity of the model the numbers came
from.  Every run is compared with per-metric tolerances; files are rewritten only on request,
under a file lock (read, merge, replace), atomically, and never silently replaced.

Non-finite values: NaN is a failure, never a baseline (writing one is refused, comparing one
fails); +Inf and -Inf (an exact SQNR) are stored as the strings ``"inf"`` and ``"-inf"`` and
are within tolerance only of the same infinity."""

from __future__ import annotations

import datetime as dt
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import harness
from harness import atomic
from harness.formats import FORMATS
from harness.policy import CROSS_DEVICE_WEIGHT_ONLY, DEFAULT_TOLERANCE, Tolerance, policy_for

SCHEMA_VERSION = 1


class BaselineError(Exception):
    """A baseline file that cannot be read; names the file."""


def tolerance_for(metric: str) -> Tolerance:
    """The tolerance of the metric's policy (:func:`harness.policy.policy_for`: its own entry or
    its longest known suffix, ``weight_sqnr_db`` -> ``sqnr_db``), else 1 % relative."""
    policy = policy_for(metric)
    return policy.tolerance if policy is not None else DEFAULT_TOLERANCE


ACTIVATION_POINT_IDS = ("w16a4", "w4a4")  # the suites' case-id tokens of input-quantized points


class CrossDeviceBaseline(UserWarning):
    """A --gpu case was compared with the CPU baseline (no CUDA baseline for it)."""


@dataclass(frozen=True)
class EitherTolerance:
    """Allows a change that either tolerance allows (a metric's own and the cross-device one)."""

    own: Tolerance
    cross_device: Tolerance

    def allows(self, old: float, new: float) -> bool:
        return self.own.allows(old, new) or self.cross_device.allows(old, new)

    def __str__(self) -> str:
        return f"{self.own} or {self.cross_device} (cross-device)"


def cross_device_tolerance(case_id: str):
    """``metric -> tolerance`` for comparing ``case_id`` with another device's baseline. Cases of
    activation-quantized points (an id token in :data:`ACTIVATION_POINT_IDS`) and of stochastic
    formats (the id's first token; other devices draw other random numbers) get
    the metric policy's ``cross_device`` allowance (:mod:`harness.policy`)."""
    tokens = case_id.split("-")
    stochastic = tokens[0] in FORMATS and FORMATS[tokens[0]].stochastic
    noisy = stochastic or any(token in ACTIVATION_POINT_IDS for token in tokens)

    def tolerance(metric: str) -> EitherTolerance:
        policy = policy_for(metric) if noisy else None
        cross = (policy.cross_device if policy is not None else None) or CROSS_DEVICE_WEIGHT_ONLY
        return EitherTolerance(tolerance_for(metric), cross)

    return tolerance


def cpu_fallback(
    path: Path, case_id: str, identity: dict[str, object] | None = None
) -> tuple[Path, dict[str, dict[str, float]], dict, Callable] | None:
    """For a case missing from a CUDA baseline file: ``(the CPU file, its cases, its items, its
    cross-device tolerance)`` when the CPU file of the same model, dtype and suite has the case
    (``cuda-bfloat16`` falls back to ``cpu-bfloat16``; and a :class:`CrossDeviceBaseline` warning
    says so), else None. It never compares across dtypes."""
    device, _, dtype = path.parent.name.partition("-")
    if device != "cuda":
        return None
    cpu = path.parent.with_name("-".join(filter(None, ("cpu", dtype)))) / path.name
    cases, items = read_baseline_file(cpu, identity)
    if case_id not in cases:
        return None
    message = f"{case_id}: no CUDA baseline in {path}, compared with {cpu} under cross-device tolerances"
    warnings.warn(message, CrossDeviceBaseline, stacklevel=3)
    return cpu, cases, items, cross_device_tolerance(case_id)


def baseline_path(root: Path, model: str, device: str, suite: str) -> Path:
    return root / model / device / f"{suite}.json"


_INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def _number(value: object, where: str) -> float:
    """A stored value: a JSON number (not a bool, not a string such as "1.5") or "inf"/"-inf"."""
    if isinstance(value, str) and value in _INFINITIES:
        return _INFINITIES[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f'{where} is {value!r}, not a number (a JSON number, or "inf"/"-inf")')
    return float(value)


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {type(value).__name__}, not an object")
    return value


def check_values(case: str, metrics: dict[str, float], items: dict[str, list[float]] | None = None) -> None:
    """BaselineError when a metric or per-item value is NaN: a failure, never a baseline."""
    bad = [k for k, v in metrics.items() if math.isnan(v)]
    bad += [k for k, v in (items or {}).items() if any(math.isnan(x) for x in v)]
    if bad:
        raise BaselineError(
            f"{case}: {', '.join(sorted(set(bad)))} is NaN: the run failed (a NaN is never stored as a baseline)"
        )


def read_baseline_file(
    path: Path, identity: dict[str, object] | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """``(cases, items)`` of a baseline file, read once: ``{case: {metric: value}}`` and the
    per-item values of the metrics judged by a paired test, ``{case: {metric: [value per item]}}``
    (both {} if the file does not exist); BaselineError if it is corrupt (any value that is not
    a number) or, when ``identity`` is given, if the file holds numbers of another model."""
    cases, items, _ = _read(path, identity)
    return cases, items


def _read(path: Path, identity: dict[str, object] | None) -> tuple[dict, dict, dict[str, object]]:
    """:func:`read_baseline_file` plus the model identity the file records ({} if none)."""
    if not path.exists():
        return {}, {}, {}
    try:
        doc = _object(json.loads(path.read_text()), "the file")
        if doc.get("schema_version") != SCHEMA_VERSION or not isinstance(doc.get("cases"), dict):
            raise ValueError(f"expected schema_version {SCHEMA_VERSION} and a 'cases' object")
        cases = {
            case: {k: _number(v, f"cases.{case}.{k}") for k, v in _object(metrics, f"cases.{case}").items()}
            for case, metrics in doc["cases"].items()
        }
        items: dict[str, dict[str, list[float]]] = {}
        for case, metrics in _object(doc.get("items", {}), "items").items():
            items[case] = {}
            for k, v in _object(metrics, f"items.{case}").items():
                if not isinstance(v, list):
                    raise ValueError(f"items.{case}.{k} is {type(v).__name__}, not a list of numbers")
                items[case][k] = [_number(x, f"items.{case}.{k}[{i}]") for i, x in enumerate(v)]
        stored = _object(doc.get("model", {}), "model")
    except (ValueError, AttributeError, TypeError) as err:
        raise BaselineError(
            f"{path}: corrupted baseline file ({err}). It is never replaced automatically: restore it "
            "from git, or delete it and recreate it with --update-baselines"
        ) from err
    if identity is not None and stored and stored != identity:
        raise BaselineError(
            f"{path} holds the baselines of another model ({_describe(stored)}); the model under test "
            f"is {_describe(identity)}. Pass the model these baselines belong to, or another --baselines-dir; "
            "to start this model's baselines, delete the file and run with --update-baselines"
        )
    return cases, items, stored


def _describe(identity: dict[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in identity.items())


def write_baselines(
    path: Path,
    updates: dict[str, dict[str, float]],
    items: dict[str, dict[str, list[float]]] | None = None,
    identity: dict[str, object] | None = None,
) -> None:
    """Merge ``updates`` (and per-item ``items``) into the file, other cases kept, atomically.

    Read, merge and replace happen under a lock held outside the repository
    (:func:`harness.atomic.lock`), so concurrent writers lose nothing; the file is replaced
    all-or-nothing (:class:`harness.atomic.Transaction`: a full disk or Ctrl-C leaves the previous
    file as it was), keeps the mode of the file it replaces, and a symlinked file has its target
    updated.  ``identity`` (:func:`harness.models.model_identity`) is recorded; a file of another
    model is refused (BaselineError).  NaN values are refused (:func:`check_values`)."""
    for case, metrics in updates.items():
        check_values(case, metrics, (items or {}).get(case))
    with atomic.lock(path):
        stored_cases, stored_items, stored_identity = _read(path, identity)
        cases = stored_cases | updates
        stored_items = stored_items | (items or {})
        doc = {
            "schema_version": SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "harness_version": harness.__version__,
            "torch_version": torch.__version__,
        }
        if identity or stored_identity:
            doc["model"] = identity or stored_identity
        doc["cases"] = {c: {k: _encode(v) for k, v in m.items()} for c, m in sorted(cases.items())}
        if stored_items:
            doc["items"] = {
                c: {k: [_encode(x) for x in v] for k, v in m.items()} for c, m in sorted(stored_items.items())
            }
        atomic.write_text(path, json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")


def comparison_table(old: dict[str, float], new: dict[str, float], tolerance=tolerance_for) -> tuple[bool, str]:
    """(all within tolerance, a table of baseline vs now per metric); ``tolerance(metric)``."""
    rows, ok = [], True
    for metric in sorted(set(old) | set(new)):
        o, n = old.get(metric, math.nan), new.get(metric, math.nan)
        tol = tolerance(metric)
        fine = metric in old and metric in new and tol.allows(o, n)
        ok &= fine
        change = (n - o) / abs(o) if o not in (0.0,) and not math.isnan(o) and not math.isnan(n) else math.nan
        rows.append(
            [metric, o, n, f"{change:+.2%}", str(tol), "ok" if fine else "REGRESSION" if metric in old else "new"]
        )
    table = tabulate(rows, headers=["metric", "baseline", "now", "change", "tolerance", ""], floatfmt=".5g")
    return ok, table
