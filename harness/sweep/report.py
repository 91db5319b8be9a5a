"""One view of a sweep: ``summary.md``, ``heatmap.png``, and the job-by-job gate of two sweeps.

Per job the summary gives what its document says with its uncertainty: ``eval loss`` the loss
increase (quantized − reference, mean of per-item differences, 95% bootstrap CI), KL(ref ‖ quant)
and top-1 agreement (means of per-item values, 95% bootstrap CI); ``eval gsm8k`` the accuracy
change against the unquantized run (paired, its CI); ``aqn preflight`` the verdict and loss
increase over noise draws; ``scan`` the recommendation and the layers flagged.  The heatmaps show
each metric as format x model (at one point) and format x point (for one model), every cell with
its CI and n.  :func:`gate_sweeps` gates every job of a new sweep against the job of the same key
in an old one with :func:`harness.gate.gate_documents`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness.sweep.plan import JobKind
from harness.sweep.store import DONE, Store, read_json

# Kinds whose documents hold per-item values (the ones the gate reads).
GATED = (JobKind.EVAL_LOSS.value, JobKind.EVAL_GSM8K.value)
GSM8K_METRICS = ("exact_match,strict-match", "bits_per_byte,none")


@dataclass(frozen=True)
class Cell:
    """One number of the matrix: ``value`` with its 95% CI over ``n`` items (or draws)."""

    value: float
    low: float
    high: float
    n: int

    def text(self, fmt: str = "+.4f") -> str:
        return f"{self.value:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}] n={self.n}"


def _mean_cell(values: list[float]) -> Cell:
    from harness.eval.stats import bootstrap_ci

    low, high = bootstrap_ci(values)
    return Cell(sum(values) / len(values), low, high, len(values))


def metrics(kind: str, doc: dict) -> dict[str, Cell]:
    """The matrix's numbers of one job document (empty for scans, whose result is not one number)."""
    if kind == JobKind.EVAL_LOSS.value:
        c = doc["details"]["comparison"]  # a per-item document (harness.peritem)
        per_item = doc["per_item"]
        return {
            "loss increase": Cell(c["mean_diff"], c["ci_low"], c["ci_high"], c["n"]),
            "KL": _mean_cell(per_item["kl"]),
            "top-1 agreement": _mean_cell(per_item["top1_agree"]),
        }
    if kind == JobKind.EVAL_GSM8K.value:
        cmps = next(iter(doc["details"].get("comparisons", {}).values()), {})
        return {
            f"accuracy change ({m.split(',')[0]})": Cell(c["mean_diff"], c["ci_low"], c["ci_high"], c["n"])
            for m, c in cmps.items()
            if m in GSM8K_METRICS
        }
    if kind == JobKind.AQN_PREFLIGHT.value:
        li = doc["loss_increase"]
        return {"pre-flight loss increase": Cell(li["mean"], li["low"], li["high"], len(doc["draws"]))}
    return {}


def _outcome(kind: str, doc: dict) -> str:
    if kind == JobKind.SCAN.value:
        from harness.srdd.document import ScanDocument

        scan = ScanDocument.from_json(doc)
        flagged = sum(layer.problematic for layer in scan.layers)
        nonfinite = "; NaN/Inf found" if scan.has_nonfinite else ""
        return f"{scan.recommendation.action}: {flagged} of {len(scan.layers)} layers flagged{nonfinite}"
    if kind == JobKind.AQN_PREFLIGHT.value:
        return doc["verdict"]
    return ""


def _rows(store: Store) -> list[tuple[dict, dict | None]]:
    return [
        (row, read_json(store.root / row["document"]) if row["status"] == DONE else None)
        for row in store.manifest()["jobs"]
    ]


def summary_markdown(store: Store) -> str:
    rows = _rows(store)
    done = sum(doc is not None for _, doc in rows)
    lines = [
        f"# Sweep {store.root.name}",
        "",
        f"{done} of {len(rows)} jobs finished. Values: mean [95% CI] n (n: items, or noise draws for the pre-flight).",
        "",
        "| job | status | result |",
        "|---|---|---|",
    ]
    for row, doc in rows:
        if doc is None:
            lines.append(f"| {row['key']} | {row['status']} | {row.get('error') or ''} |")
            continue
        parts = [f"{name} {cell.text()}" for name, cell in metrics(row["kind"], doc).items()]
        parts += [p for p in [_outcome(row["kind"], doc)] if p]
        lines.append(f"| {row['key']} | done | {'; '.join(parts)} |")
    return "\n".join(lines) + "\n"


def _panels(rows: list[tuple[dict, dict | None]]) -> list[tuple[str, str, list[str], list[str], dict]]:
    """(metric, title, row labels = formats, column labels, {(format, column): Cell}) per panel."""
    cells: dict[str, dict[tuple[str, str, str], Cell]] = {}
    for row, doc in rows:
        if doc is None or row.get("seed") not in (None, min(r.get("seed") or 0 for r, _ in rows)):
            continue
        for name, cell in metrics(row["kind"], doc).items():
            cells.setdefault(name, {})[(row["format"], row["model"], row["point"])] = cell
    panels = []
    for name, by in cells.items():
        formats = sorted({f for f, _, _ in by})
        models = sorted({m for _, m, _ in by})
        points = sorted({p for _, _, p in by})
        point = "weight" if "weight" in points else points[0]
        by_model = {(f, m): c for (f, m, p), c in by.items() if p == point}
        panels.append((name, f"{name}: format x model (point {point})", formats, models, by_model))
        by_point = {(f, p): c for (f, m, p), c in by.items() if m == models[0]}
        panels.append((name, f"{name}: format x point ({models[0]})", formats, points, by_point))
    return panels


def heatmap(store: Store, path: Path) -> Path | None:
    """The panels of :func:`_panels` in one PNG (None when no job has a number to show)."""
    panels = _panels(_rows(store))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(12, 3.2 * len(panels) // 2), squeeze=False)
    for ax, (_, title, formats, cols, by) in zip(axes.flat, panels):
        grid = [[by[(f, c)].value if (f, c) in by else math.nan for c in cols] for f in formats]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xticks=range(len(cols)), yticks=range(len(formats)))
        ax.set_xticklabels([Path(c).name for c in cols], rotation=20)
        ax.set_yticklabels(formats)
        for i, f in enumerate(formats):
            for j, c in enumerate(cols):
                if (f, c) in by:
                    cell = by[(f, c)]
                    label = f"{cell.value:.3g}\n[{cell.low:.3g}, {cell.high:.3g}]\nn={cell.n}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(root: str | Path) -> list[Path]:
    """``summary.md`` and (when any job has a number) ``heatmap.png`` in the sweep folder ``root``."""
    store = Store(root)
    summary = store.root / "summary.md"
    summary.write_text(summary_markdown(store))
    png = heatmap(store, store.root / "heatmap.png")
    return [summary, *([png] if png else [])]


def gate_sweeps(old: str | Path, new: str | Path, **gate_options) -> tuple[list[str], int]:
    """One line per job of either sweep and the exit code of the run's one verdict
    (:func:`harness.gate.combine`: Holm over every gated metric of every job; 0 pass, 1 regression,
    2 inconclusive, not comparable or unreadable).  Jobs with per-item values (``eval loss``,
    ``eval gsm8k``) are gated (:func:`harness.gate.gate_files`); scans and pre-flights hold none and
    are listed as not gated (no effect on the exit code); a job missing or unfinished on either side
    is not comparable."""
    from harness.gate import NOT_COMPARABLE, GateReport, combine, gate_files

    old_store, new_store = Store(old), Store(new)
    old_rows = {r["key"]: r for r in old_store.manifest()["jobs"]}
    new_rows = {r["key"]: r for r in new_store.manifest()["jobs"]}
    lines, reports = [], []
    for key in sorted(old_rows.keys() | new_rows.keys()):
        a, b = old_rows.get(key), new_rows.get(key)
        if a is None or b is None:
            reports.append(GateReport((), NOT_COMPARABLE, f"only in the {'new' if a is None else 'old'} sweep", key))
        elif a["kind"] not in GATED:
            lines.append(f"{key}: not gated: a {a['kind']} document holds no per-item values")
        elif a["status"] != DONE or b["status"] != DONE:
            why = f"the job is {a['status']} in the old sweep, {b['status']} in the new one"
            reports.append(GateReport((), NOT_COMPARABLE, why, key))
        else:
            report = gate_files(old_store.root / a["document"], new_store.root / b["document"], **gate_options)
            reports.append(GateReport(report.results, report.outcome, report.problem, key))
    run = combine(reports)
    judged = iter(run.results)  # Holm over the run, in the order of the reports' results
    for report in reports:
        lines += [f"{report.case}: {report.outcome.value}: {report.problem}"] if report.problem else []
        lines += [next(judged).line() for _ in report.results]
    return lines, run.exit_code
