"""Stored baselines (design §8): ``baselines/<model>/<device>/<suite>.json`` holding
``{case_id: {metric: value}}`` plus provenance.  Every run is compared with per-metric
tolerances; files are rewritten only on request, atomically, and never silently replaced."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import harness
from harness.eval.stats import PairedComparison, compare_paired
from harness.formats import FORMATS

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


@dataclass(frozen=True)
class PairedGate:
    """A metric judged on per-item values against the baseline's: a regression is a change in the
    bad direction larger than ``tolerance`` (metric units) *and* significant (design §8)."""

    tolerance: float
    higher_is_better: bool
    binary: bool  # per-item correctness: McNemar; else a paired t-test

    def judge(self, old: Sequence[float], new: Sequence[float]) -> tuple[bool, PairedComparison]:
        cmp = compare_paired(old, new, binary=self.binary)
        return not cmp.regressed(self.tolerance, higher_is_better=self.higher_is_better), cmp

    def __str__(self) -> str:
        return f"drop > {self.tolerance:g} and p < 0.05"


# Accuracy is a significance test, never a fixed tolerance: on 1319 items one flipped answer is 0.08 %.
PAIRED_GATES: dict[str, PairedGate] = {"exact_match": PairedGate(0.01, higher_is_better=True, binary=True)}


def _by_suffix(metric: str, table: dict):
    """The entry for the metric itself, else for its longest known ``_``-separated suffix."""
    for i in range(len(metric)):
        if (i == 0 or metric[i - 1] == "_") and metric[i:] in table:
            return table[metric[i:]]
    return None


def paired_gate_for(metric: str) -> PairedGate | None:
    return _by_suffix(metric, PAIRED_GATES)


# A --gpu case without a CUDA baseline is compared with the CPU one (design §8), allowing the larger
# of the metric's own tolerance and the cross-device difference measured on 2026-11-26 (an H200,
# torch 2.11.0+cu130, against the 2-core CPU's baselines, shared/gpu-runs/2026-11-26-h200):
# unquantized and weight-only cases agreed to <= 2e-5 relative (loss, kl, bits_per_byte) and exactly
# (top1_agree, every SRDD weight metric), so 1e-3 relative; activation-quantized cases differ where a
# block scale or a rounding tie flips under another matmul summation order: about 1.5x the largest
# difference measured per metric kind (in the comments), with the metric's own tolerance as a floor.
CROSS_DEVICE_WEIGHT_ONLY = Tolerance("rel", 1e-3)
CROSS_DEVICE_ACTIVATIONS: dict[str, Tolerance] = {
    "loss": Tolerance("rel", 0.012),  # 0.75 % (nvfp4 W4A4: 1.7454 CPU, 1.7585 CUDA)
    "kl": Tolerance("rel", 0.05),  # 3.2 % (mxfp6_e2m3 W4A4)
    "top1_agree": Tolerance("abs", 0.012),  # 0.0074 (mxfp6_e3m2 W16A4)
    "sqnr_db": Tolerance("abs", 0.1),  # 0.065 dB (mxfp8_e4m3 W16A4)
    "deadzone_ratio": Tolerance("abs", 2e-4),  # 1.0e-4 (mxfp4_2d W16A4)
    "saturation_ratio": Tolerance("abs", 2e-5),  # 1.0e-5 (nvfp4 W16A4)
    "relative_error": Tolerance("rel", 1e-3),  # 0.06 % (mxfp4_sr W4A16), 0.03 % (mxfp4_2d W16A4)
}
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
    :data:`CROSS_DEVICE_ACTIVATIONS`."""
    tokens = case_id.split("-")
    stochastic = tokens[0] in FORMATS and FORMATS[tokens[0]].stochastic
    noisy = stochastic or any(token in ACTIVATION_POINT_IDS for token in tokens)

    def tolerance(metric: str) -> EitherTolerance:
        cross = (_by_suffix(metric, CROSS_DEVICE_ACTIVATIONS) if noisy else None) or CROSS_DEVICE_WEIGHT_ONLY
        return EitherTolerance(tolerance_for(metric), cross)

    return tolerance


def cpu_fallback(path: Path, case_id: str) -> tuple[Path, dict[str, dict[str, float]], dict, Callable] | None:
    """For a case missing from a CUDA baseline file: ``(the CPU file, its cases, its items, its
    cross-device tolerance)`` when the CPU file of the same model and suite has the case (and a
    :class:`CrossDeviceBaseline` warning saying so), else None. Case ids name the dtype where a
    suite runs several, so this never compares across dtypes."""
    if path.parent.name != "cuda":
        return None
    cpu = path.parent.with_name("cpu") / path.name
    cases, items = read_baseline_file(cpu)
    if case_id not in cases:
        return None
    message = f"{case_id}: no CUDA baseline in {path}, compared with {cpu} under cross-device tolerances"
    warnings.warn(message, CrossDeviceBaseline, stacklevel=3)
    return cpu, cases, items, cross_device_tolerance(case_id)


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


def paired_gate_table(old: dict[str, list[float]], new: dict[str, list[float]]) -> tuple[bool, str]:
    """(no paired regression, a table per metric: baseline and current means, difference with
    its bootstrap CI, p-value, verdict). Different item counts are an error, not a comparison."""
    rows, ok = [], True
    for metric in sorted(new):
        gate = paired_gate_for(metric)
        if metric not in old or len(old[metric]) != len(new[metric]):
            ok = False
            n_old = len(old.get(metric, []))
            rows.append(
                [metric, f"n={n_old}", f"n={len(new[metric])}", "", "", "", str(gate), "NOT COMPARABLE: other items"]
            )
            continue
        fine, cmp = gate.judge(old[metric], new[metric])
        ok &= fine
        verdict = "ok" if fine else "REGRESSION"
        if fine and cmp.significant:
            verdict = "ok (significant change within tolerance)" if abs(cmp.mean_diff) <= gate.tolerance else "improved"
        rows.append(
            [
                metric,
                cmp.mean_a,
                cmp.mean_b,
                f"{cmp.mean_diff:+.4f}",
                f"[{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]",
                f"{cmp.p_value:.3g}",
                str(gate),
                verdict,
            ]
        )
    headers = ["metric", "baseline", "now", "diff", "95% CI", "p", "gate", ""]
    return ok, tabulate(rows, headers=headers, floatfmt=".4f")
