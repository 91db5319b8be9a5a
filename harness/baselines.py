"""Stored baselines (design §8): ``baselines/<model>/<device>/<suite>.json`` holding
``{case_id: {metric: value}}`` plus provenance.  Every run is compared with per-metric
tolerances; files are rewritten only on request, atomically, and never silently replaced."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import harness

SCHEMA_VERSION = 1


class BaselineError(Exception):
    """A baseline file that cannot be read; names the file."""


@dataclass(frozen=True)
class Tolerance:
    """Allowed change: ``abs`` in the metric's unit, or ``rel`` as a fraction of the baseline."""

    kind: str
    value: float

    def allows(self, old: float, new: float) -> bool:
        if math.isnan(old) or math.isnan(new):
            return math.isnan(old) and math.isnan(new)
        bound = self.value if self.kind == "abs" else self.value * abs(old)
        return abs(new - old) <= bound + 1e-12

    def __str__(self) -> str:
        return f"±{self.value:g}" if self.kind == "abs" else f"±{self.value:.1%}"


# Per metric kind: losses relative, probabilities and dB absolute.  Two-sided: a change beyond
# tolerance in either direction fails (a sudden "improvement" is as suspicious as a drop).
TOLERANCES: dict[str, Tolerance] = {
    "reference_loss": Tolerance("rel", 0.002),
    "loss": Tolerance("rel", 0.005),
    "kl": Tolerance("rel", 0.03),
    "top1_agree": Tolerance("abs", 0.005),
    "sqnr_db": Tolerance("abs", 0.05),
    "deadzone_ratio": Tolerance("abs", 0.002),
    "saturation_ratio": Tolerance("abs", 0.001),
    "relative_error": Tolerance("rel", 0.01),
    "bits_per_byte": Tolerance("rel", 0.005),
}
DEFAULT_TOLERANCE = Tolerance("rel", 0.01)


def tolerance_for(metric: str) -> Tolerance:
    """The metric's own tolerance, else that of its longest known suffix (``weight_sqnr_db`` ->
    ``sqnr_db``), else 1 % relative."""
    return _by_suffix(metric, TOLERANCES) or DEFAULT_TOLERANCE


def _by_suffix(metric: str, table: dict):
    """The entry for the metric itself, else for its longest known ``_``-separated suffix."""
    for i in range(len(metric)):
        if (i == 0 or metric[i - 1] == "_") and metric[i:] in table:
            return table[metric[i:]]
    return None


def baseline_path(root: Path, model: str, device: str, suite: str) -> Path:
    return root / model / device / f"{suite}.json"


def read_baseline_file(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """``(cases, items)`` of a baseline file, read once: ``{case: {metric: value}}`` and the
    per-item values of the metrics judged by a paired test, ``{case: {metric: [value per item]}}``
    (both {} if the file does not exist); BaselineError if it is corrupt."""
    if not path.exists():
        return {}, {}
    try:
        doc = json.loads(path.read_text())
        if doc.get("schema_version") != SCHEMA_VERSION or not isinstance(doc.get("cases"), dict):
            raise ValueError(f"expected schema_version {SCHEMA_VERSION} and a 'cases' object")
        cases = {case: {k: float(v) for k, v in metrics.items()} for case, metrics in doc["cases"].items()}
        items = {
            case: {k: [float(x) for x in v] for k, v in metrics.items()}
            for case, metrics in doc.get("items", {}).items()
        }
        return cases, items
    except (ValueError, AttributeError, TypeError) as err:
        raise BaselineError(
            f"{path}: corrupted baseline file ({err}). It is never replaced automatically: restore it "
            "from git, or delete it and recreate it with --update-baselines"
        ) from err


def read_baselines(path: Path) -> dict[str, dict[str, float]]:
    """The cases of a baseline file (see :func:`read_baseline_file`)."""
    return read_baseline_file(path)[0]


def write_baselines(
    path: Path, updates: dict[str, dict[str, float]], items: dict[str, dict[str, list[float]]] | None = None
) -> None:
    """Merge ``updates`` (and per-item ``items``) into the file, other cases kept, atomically."""
    stored_cases, stored_items = read_baseline_file(path)
    cases = stored_cases | updates
    stored_items = stored_items | (items or {})
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "harness_version": harness.__version__,
        "torch_version": torch.__version__,
        "cases": dict(sorted(cases.items())),
    }
    if stored_items:
        doc["items"] = dict(sorted(stored_items.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def comparison_table(old: dict[str, float], new: dict[str, float]) -> tuple[bool, str]:
    """(all within tolerance, a table of baseline vs now per metric)."""
    rows, ok = [], True
    for metric in sorted(set(old) | set(new)):
        o, n = old.get(metric, math.nan), new.get(metric, math.nan)
        tol = tolerance_for(metric)
        fine = metric in old and metric in new and tol.allows(o, n)
        ok &= fine
        change = (n - o) / abs(o) if o not in (0.0,) and not math.isnan(o) and not math.isnan(n) else math.nan
        rows.append(
            [metric, o, n, f"{change:+.2%}", str(tol), "ok" if fine else "REGRESSION" if metric in old else "new"]
        )
    table = tabulate(rows, headers=["metric", "baseline", "now", "change", "tolerance", ""], floatfmt=".5g")
    return ok, table
