"""Reports of SRDD scans: a markdown summary with tabulate tables (per layer, with each
verdict's rule and evidence), the JSON, PNG plots (matplotlib, Agg), and the
comparison of two scans."""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from harness import atomic
from harness.inject import Coverage
from harness.models import EMBEDDED
from harness.srdd.document import ScanDocument

FLOOR_METRICS = [  # (metric, label, as percent)
    ("sqnr_db", "SQNR (dB)", False),
    ("deadzone_ratio", "Deadzone", True),
    ("saturation_ratio", "Saturation (clipping that matters)", True),
    ("relative_error", "Relative error", True),
]
ACTIVATION_METRICS = [  # (metric, label): local detectors (the layer quantized alone on its reference input)
    ("output_error", "Output error ‖(W−Q(W))X‖/‖WX‖"),
    ("local_output_sqnr_db", "Layer-output SQNR, local (dB, non-sink tokens)"),
    ("local_kurtosis_ratio", "Kurtosis ratio, local (quant/ref, non-sink tokens)"),
    ("local_massive_ratio", "Massive activation, local (quant/ref)"),
    ("gain_ratio", "Residual-branch gain ratio (quant/ref)"),
    ("instability", "Instability (std/RMS over runs)"),
]
CUMULATIVE_METRICS = [  # the fully quantized model: how error grows with depth (a plot, never a verdict)
    ("output_sqnr_db", "Layer-output SQNR, cumulative (dB, non-sink tokens)"),
    ("kurtosis_ratio", "Kurtosis ratio, cumulative"),
    ("massive_ratio", "Massive activation, cumulative"),
]
GROUPS = 5


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2%}" if pct else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"


def _span(doc: ScanDocument, key: str, pct: bool = False, layers=None) -> str | None:
    values = [row.metrics[key] for row in (layers or doc.layers) if key in row.metrics]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return f"{_fmt(min(values), pct)} – {_fmt(max(values), pct)}" if values else None


def _flagged(doc: ScanDocument, rule: str, metric: str) -> int:
    return sum(any(r.rule == rule and r.metric == metric for r in row.reasons) for row in doc.layers)


def _pointed(doc: ScanDocument, metric: str) -> int:
    return sum(any(r.metric == metric for r in row.pointers) for row in doc.layers)


def metric_ranges(doc: ScanDocument) -> list[list[str]]:
    """Per source and detector: the range over layers, the Gaussian floor's range, and how many
    layers the floor rule flags (weights) or the detector points at (local activation detectors:
    an exact attribution row, no verdict); the cumulative curves are shown, never judged."""
    rows = []
    n_layers = len(doc.layers)
    for source in ("weight", "input"):
        for metric, label, pct in FLOOR_METRICS:
            span = _span(doc, f"{source}_{metric}", pct)
            if span is None:
                continue
            if source == "weight":
                n = _flagged(doc, "floor", metric)
                status = f"floor: {n}/{n_layers}" if n else "OK"
            else:
                n = _pointed(doc, f"input_{metric}")
                status = f"points at {n}/{n_layers}" if n else "OK"
            rows.append([f"{source} {label}", span, _span(doc, f"{source}_{metric}_floor", pct) or "n/a", status])
    for metric, label in ACTIVATION_METRICS:
        span = _span(doc, metric)
        if span is not None:
            n = _pointed(doc, metric)
            rows.append([label, span, "(among layers)", f"points at {n}/{n_layers}" if n else "OK"])
    for metric, label in CUMULATIVE_METRICS:
        span = _span(doc, metric)
        if span is not None:
            rows.append([label, span, "(plot only)", "not judged"])
    return rows


def layer_groups(doc: ScanDocument) -> tuple[list[list[str]], str]:
    """The layers in ~5 contiguous groups with each group's metric ranges."""
    layers = doc.layers
    size = max(1, math.ceil(len(layers) / GROUPS))
    source = "weight" if any("weight_sqnr_db" in row.metrics for row in layers) else "input"
    rows = []
    for g0 in range(0, len(layers), size):
        group = layers[g0 : g0 + size]
        cells = [f"L{g0}-L{g0 + len(group) - 1}"]
        for key, pct in (("sqnr_db", False), ("sqnr_db_floor", False), ("deadzone_ratio", True)):
            cells.append(_span(doc, f"{source}_{key}", pct, group) or "n/a")
        cells.append(_span(doc, "attribution_kl", False, group) or "n/a")
        cells.append(f"{sum(r.problematic for r in group)}/{len(group)}")
        rows.append(cells)
    return rows, source


def _massive(doc: ScanDocument) -> list[str]:
    peaks = [row for row in doc.layers if row.metrics.get("massive_ref")]
    if not peaks:
        return []
    top = max(peaks, key=lambda r: r.metrics["massive_ref"])
    m = top.metrics
    return [
        f"Massive activation: largest |h| {m['massive_ref']:.4g} (reference) at {top.name}, token position "
        f"{int(m['massive_position'])}, hidden dim {int(m['massive_dim'])}; {m['massive_quant']:.4g} quantized.",
        "",
    ]


def markdown_summary(doc: ScanDocument) -> str:
    rec, ver = doc.recommendation, doc.recommendation.verification
    n = len(doc.layers)
    out = [f"# SRDD scan: {doc.model} under {doc.format} ({doc.point})", ""]
    if doc.coverage:
        out += [f"> Coverage: {Coverage.from_json(doc.coverage).line()}.", ""]
    if doc.model in EMBEDDED:
        out += [f"> Caveat: {EMBEDDED[doc.model].caveat}.", ""]
    thresholds = {k: v for k, v in doc.thresholds.items() if v is not None}
    out += [
        f"{doc.prompts} calibration prompts ({doc.tokens} tokens) from GSM8K train; "
        f"{len(doc.modules)} Linear modules in {n} decoder layers; "
        f"scan time {doc.timings_s.get('total', math.nan):.1f} s.",
        "",
        "Rules: a layer is problematic when quantizing it alone raises the loss beyond the negligible band "
        f"(exact Δloss CI above δ = {doc.rules.get('negligible_delta', 0.0):g} nats/token) and it is an outlier "
        "among the layers by log KL or log Δloss (robust z above the threshold calibrated to the number of "
        f"layers, family-wise {doc.rules.get('outlier_alpha', 0.0):g} per metric), or when one of its weights is "
        "worse than the format's own floor (a seeded Gaussian tensor of its shape and RMS; error > "
        f"{doc.rules['floor_factor']:g}x the floor's). Local activation detectors (each layer quantized alone "
        "on its reference input) only point at layers for an exact attribution row and explain; the "
        "cumulative curves are plots. Absolute thresholds: "
        + (", ".join(f"{k} {v:g}" for k, v in thresholds.items()) if thresholds else "none (off by default)")
        + ".",
        "",
        "## Metric ranges and floors",
        "",
        tabulate(
            metric_ranges(doc), headers=["Metric", "Range over layers", "Gaussian floor", "Flagged"], tablefmt="github"
        ),
        "",
        *_massive(doc),
        "## Layer groups",
        "",
    ]
    rows, source = layer_groups(doc)
    headers = ["Layers", f"{source} SQNR (dB)", "floor (dB)", "Deadzone", "Attribution KL", "Problematic"]
    out += [tabulate(rows, headers=headers, tablefmt="github"), ""]
    bad = [row for row in doc.layers if row.problematic]
    out += [f"## Problematic layers: {len(bad)}/{n}", ""]
    if bad:
        table = [[row.name, r.rule, r.tensor, r.metric, r.evidence] for row in bad for r in row.reasons]
        out += [tabulate(table, headers=["Layer", "Rule", "Tensor", "Metric", "Evidence"], tablefmt="github"), ""]
        out += ["Why (each problematic layer's Linears, local detectors, largest error first):", ""]
        out += [f"- {row.name}: " + "; ".join(row.why) for row in bad if row.why] + [""]
    pointed = [row for row in doc.layers if row.pointers]
    if pointed:
        out += ["Local detectors pointed at (exact attribution rows, no verdict): "]
        out[-1] += "; ".join(f"{row.name} ({', '.join(r.metric for r in row.pointers)})" for row in pointed) + "."
        out += [""]
    if doc.attribution:
        everything = doc.attribution[0]
        per_layer = sorted(doc.attribution[1:], key=lambda a: -a.delta_loss)
        table = [
            [
                a.layer,
                a.kl,
                a.delta_loss,
                f"[{a.ci[0]:+.4f}, {a.ci[1]:+.4f}]",
                a.label or ("harmful" if a.harmful else ""),
            ]
            for a in [everything, *per_layer[:12]]
        ]
        which = f"{len(per_layer)} layers the screen ranked first or a detector pointed at" if doc.screen else "top 12"
        out += _table_section(
            f"## Loss attribution ({doc.evaluation_items} GSM8K test items; one layer quantized at a time, "
            f"exact; {which}, by Δloss)",
            [],
            table,
            ["Quantized", "KL", "Δloss", "Δloss 95% CI", f"Label (band ±{doc.rules.get('negligible_delta', 0):g})"],
            "+.4f",
        )
    out += _screen(doc)
    out += _recommendation(doc, rec, ver)
    plots = ["![SQNR](sqnr.png)", "![Deadzone](deadzone.png)"]
    plots += ["![Output SQNR](output_sqnr.png)"] if any("local_output_sqnr_db" in r.metrics for r in doc.layers) else []
    plots += ["![Attribution](attribution.png)"] if doc.attribution else []
    out += ["", "Plots: " + " ".join(plots), ""]
    return "\n".join(out)


def _screen(doc: ScanDocument) -> list[str]:
    """The Fisher screen's estimates (top 10 by KL): labelled as estimates, never verdicts."""
    if not doc.screen:
        return []
    table = [
        [
            s.layer,
            s.kl,
            f"[{s.kl_ci[0]:.2e}, {s.kl_ci[1]:.2e}]",
            s.delta_loss,
            "exact row above" if s.exact else "estimate",
        ]
        for s in sorted(doc.screen, key=lambda s: -s.kl)[:10]
    ]
    return _table_section(
        "## Sensitivity screen (estimates for every layer; second-order Fisher, top 10 by KL)",
        ["Estimates rank the layers and pick which get an exact attribution; no verdict rests on them.", ""],
        table,
        ["Layer", "KL est.", "KL est. 95% CI", "Δloss est.", "Evidence"],
        ".3e",
    )


def _table_section(title: str, intro: list[str], table: list[list], headers: list[str], floatfmt: str) -> list[str]:
    return [title, "", *intro, tabulate(table, headers=headers, floatfmt=floatfmt, tablefmt="github"), ""]


def _recommendation(doc: ScanDocument, rec, ver) -> list[str]:
    if ver is not None and not ver.confirmed:
        head = ["## Recommendation: none confirmed", "", f"The rules proposed **{rec.action}** ({rec.reason});"]
        head += [f"verification: **{ver.verdict}**.", ""]
    else:
        status = " (confirmed against a control)" if ver else (" (not verified)" if rec.action != "no_action" else "")
        head = ["## Recommendation", "", f"**{rec.action}**{status}: {rec.reason}.", ""]
    if rec.bf16_layers:
        head += [f"- proposed BF16 layers: {', '.join(rec.bf16_layers)}"]
    if rec.alternative_format:
        head += [f"- milder format: {rec.alternative_format}"]
    if ver is None:
        return head
    lo, hi = ver.recovery_ci
    held = ver.heldout_items
    where = f"GSM8K test items {held[0]}-{held[-1]}" if held else "the choosing items (an old scan)"
    predicted = "n/a" if ver.predicted_recovery is None else f"{ver.predicted_recovery:.1%}"
    bits = "" if ver.bits_per_weight is None else f" Average bits per weight: {ver.bits_per_weight:.3f}"
    bits += "" if ver.budget_bits is None else f" (budget {ver.budget_bits:g})"
    return [
        *head,
        "",
        "### Verification",
        "",
        tabulate(
            [
                ["reference", ver.reference_loss, 0.0],
                [doc.format, ver.format_loss, ver.format_kl],
                [ver.proposal, ver.proposed_loss, ver.proposed_kl],
            ],
            headers=["Model", "Loss", "KL"],
            floatfmt=".4f",
            tablefmt="github",
        ),
        "",
        f"Recovery of the {doc.format} loss increase, measured on {ver.items} held-out items ({where}, "
        f"disjoint from the {doc.evaluation_items} that chose the proposal): **{ver.recovery:.1%}** (95% CI over "
        f"items {lo:.1%} – {hi:.1%}); predicted from the exact attribution: {predicted}.{bits}",
        "",
        f"Against chance: {ver.control}, measured on the first {ver.control_items} held-out items: "
        f"the proposal recovers {ver.proposal_control_recovery:.1%} there and ranks {ver.rank} of "
        f"{len(ver.control_recoveries) + 1}; control_p = (1 + draws at least as good) / (draws + 1) = "
        f"**{ver.control_p:.3f}** (draws: {', '.join(f'{r:.1%}' for r in ver.control_recoveries)}; "
        f"mean {ver.control_recovery:.1%}).",
    ]


def _bar_plot(path: Path, title: str, labels: list[str], series: dict, ylabel: str, errors=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(labels)), 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        yerr = errors.get(name) if errors else None
        ax.bar([x + i * width for x in range(len(labels))], values, width=width, label=name, yerr=yerr)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: ScanDocument, out_dir: str | Path) -> Path:
    """``summary.md``, ``results.json`` and the PNG plots as the folder ``out_dir``, replaced
    whole and all-or-nothing (:class:`harness.atomic.Transaction`); returns the summary path."""
    with atomic.Transaction() as tx:
        fill_report(doc, tx.folder(out_dir))
    return Path(out_dir, "summary.md")


def fill_report(doc: ScanDocument, out: Path) -> Path:
    """Writes ``summary.md``, ``results.json`` and the PNG plots into the folder ``out``; returns
    the summary path."""
    doc.write(out / "results.json")
    labels = [row.name.rsplit(".", 1)[-1] for row in doc.layers]
    title = f"{doc.model} {doc.format} ({doc.point})"
    for key, ylabel in (("sqnr_db", "SQNR (dB)"), ("deadzone_ratio", "deadzone ratio")):
        series = {
            name: [row.metrics.get(f"{src}_{key}{suffix}", math.nan) for row in doc.layers]
            for src in ("weight", "input")
            for suffix, name in (("", src), ("_floor", f"{src} Gaussian floor"))
            if any(f"{src}_{key}" in row.metrics for row in doc.layers)
        }
        _bar_plot(out / f"{key.split('_')[0]}.png", f"{title}: per-layer {ylabel}", labels, series, ylabel)
    if any("local_output_sqnr_db" in row.metrics for row in doc.layers):
        _bar_plot(
            out / "output_sqnr.png",
            f"{title}: layer-output SQNR, local (layer alone) vs cumulative (all quantized)",
            labels,
            {
                "local": [row.metrics.get("local_output_sqnr_db", math.nan) for row in doc.layers],
                "cumulative": [row.metrics.get("output_sqnr_db", math.nan) for row in doc.layers],
            },
            "SQNR (dB), non-sink tokens",
        )
    if doc.attribution:
        rows = doc.attribution[1:]
        delta = [r.delta_loss for r in rows]
        half = [[r.delta_loss - r.ci[0] for r in rows], [r.ci[1] - r.delta_loss for r in rows]]
        _bar_plot(
            out / "attribution.png",
            f"{title}: loss attribution (95% CI over items)",
            [r.layer.rsplit(".", 1)[-1] for r in rows],
            {"Δloss, only this layer quantized": delta},
            "Δ loss",
            {"Δloss, only this layer quantized": half},
        )
    summary = out / "summary.md"
    summary.write_text(markdown_summary(doc))
    return summary


COMPARED = [
    ("weight_sqnr_db", False),
    ("input_sqnr_db", False),
    ("weight_deadzone_ratio", True),
    ("input_deadzone_ratio", True),
    ("local_output_sqnr_db", False),
    ("output_sqnr_db", False),
    ("local_kurtosis_ratio", False),
    ("attribution_delta_loss", False),
    ("attribution_kl", False),
]


def compare_scans(a: ScanDocument, b: ScanDocument) -> str:
    """Markdown: per-layer metrics of scan A vs scan B (e.g. before vs after training, or two formats)."""
    name_a, name_b = f"{a.model}/{a.format}/{a.point}", f"{b.model}/{b.format}/{b.point}"
    keys = [
        (k, pct)
        for k, pct in COMPARED
        if any(k in r.metrics for r in a.layers) and any(k in r.metrics for r in b.layers)
    ]
    rows_b = {r.name: r for r in b.layers}
    rows = []
    for ra in a.layers:
        rb = rows_b.get(ra.name)
        if rb is None:
            continue
        cells = [ra.name]
        for k, pct in keys:
            cells += [_fmt(ra.metrics.get(k), pct), _fmt(rb.metrics.get(k), pct)]
        cells.append(f"{'yes' if ra.problematic else 'no'} → {'yes' if rb.problematic else 'no'}")
        rows.append(cells)
    headers = ["Layer"] + [f"{k} {side}" for k, _ in keys for side in ("A", "B")] + ["Problematic A → B"]
    ra_, rb_ = a.recommendation, b.recommendation
    return "\n".join(
        [
            f"# SRDD comparison: A = {name_a}, B = {name_b}",
            "",
            tabulate(
                [
                    ["problematic layers", len(a.problematic_layers), len(b.problematic_layers)],
                    ["recommendation", ra_.action, rb_.action],
                    ["confirmed", ra_.confirmed, rb_.confirmed],
                ],
                headers=["", "A", "B"],
                tablefmt="github",
            ),
            "",
            tabulate(rows, headers=headers, tablefmt="github"),
            "",
        ]
    )
