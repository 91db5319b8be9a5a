"""Reports of SRDD scans: a markdown summary with tabulate tables (the experiment's §10 and
§12.4 layout), the JSON, and PNG plots (matplotlib, Agg); and the comparison of two scans."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from harness.models import EMBEDDED

METRICS = [  # (key suffix, label, threshold key, fails when, as percent)
    ("sqnr_db", "SQNR (dB)", "sqnr_db", "below", False),
    ("deadzone_ratio", "Deadzone", "deadzone_ratio", "above", True),
    ("saturation_ratio", "Saturation", "saturation_ratio", "above", True),
    ("relative_error", "Relative error", "relative_error", "above", True),
]
RATIOS = [("kurtosis_ratio", "Kurtosis ratio (quant/ref)"), ("gain_ratio", "Gain ratio (quant/ref)")]
GROUPS = 5


def _fmt(v: float, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2%}" if pct else f"{v:.2f}"


def _fails(v: float, thr: float, when: str) -> bool:
    return v < thr if when == "below" else v > thr


def _range(layers: list[dict], key: str) -> tuple[float, float] | None:
    values = [row[key] for row in layers if key in row and not math.isnan(row[key])]
    return (min(values), max(values)) if values else None


def metric_ranges(doc: dict) -> list[list[str]]:
    """Per source and metric: the range over layers, the threshold, how many layers fail."""
    rows, layers, thr = [], doc["layers"], doc["thresholds"]
    for source in ("weight", "input"):
        for suffix, label, tkey, when, pct in METRICS:
            key = f"{source}_{suffix}"
            span = _range(layers, key)
            if span is None:
                continue
            fails = sum(_fails(row[key], thr[tkey], when) for row in layers if key in row)
            sign = "<" if when == "below" else ">"
            rows.append(
                [
                    f"{source} {label}",
                    f"{_fmt(span[0], pct)} – {_fmt(span[1], pct)}",
                    f"{sign} {_fmt(thr[tkey], pct)}",
                    f"{fails}/{len(layers)} fail" if fails else "OK",
                ]
            )
    for key, label in RATIOS:
        span = _range(layers, key)
        if span is not None:
            fails = sum(row[key] < thr[key] for row in layers if key in row)
            rows.append(
                [
                    label,
                    f"{span[0]:.3f} – {span[1]:.3f}",
                    f"< {thr[key]:g}",
                    f"{fails}/{len(layers)} fail" if fails else "OK",
                ]
            )
    span = _range(layers, "instability")
    if span is not None:
        rows.append(["Instability (std/RMS over runs)", f"{span[0]:.3g} – {span[1]:.3g}", "> 0 only for SR", ""])
    return rows


def layer_groups(doc: dict) -> list[list[str]]:
    """The layers in ~5 contiguous groups with each group's metric ranges."""
    layers = doc["layers"]
    size = max(1, math.ceil(len(layers) / GROUPS))
    source = "weight" if any("weight_sqnr_db" in row for row in layers) else "input"
    rows = []
    for g0 in range(0, len(layers), size):
        group = layers[g0 : g0 + size]
        cells = [f"L{g0}-L{g0 + len(group) - 1}"]
        for suffix, pct in (("sqnr_db", False), ("deadzone_ratio", True), ("relative_error", True)):
            span = _range(group, f"{source}_{suffix}")
            cells.append(f"{_fmt(span[0], pct)} – {_fmt(span[1], pct)}" if span else "n/a")
        span = _range(group, "attribution_delta_loss")
        cells.append(f"{span[0]:+.4f} – {span[1]:+.4f}" if span else "n/a")
        cells.append(f"{sum(r['problematic'] for r in group)}/{len(group)}")
        rows.append(cells)
    return rows, source


def markdown_summary(doc: dict) -> str:
    s = doc["summary"]
    rec, ver = s["recommendation"], s["verification"]
    out = [f"# SRDD scan: {doc['model']} under {doc['format']} ({doc['point']})", ""]
    if doc["model"] in EMBEDDED:
        out += [f"> Caveat: {EMBEDDED[doc['model']].caveat}.", ""]
    out += [
        f"{doc['prompts']} calibration prompts ({doc['tokens']} tokens) from GSM8K train; "
        f"{len(doc['modules'])} Linear modules in {s['layers']} decoder layers; "
        f"scan time {doc['timings_s'].get('total', math.nan):.1f} s.",
        "",
        "## Metric ranges against thresholds",
        "",
        tabulate(metric_ranges(doc), headers=["Metric", "Range over layers", "Threshold", "Status"], tablefmt="github"),
        "",
        "## Layer groups",
        "",
    ]
    rows, source = layer_groups(doc)
    out += [
        tabulate(
            rows,
            headers=["Layers", f"{source} SQNR (dB)", "Deadzone", "Rel. error", "Attribution Δloss", "Problematic"],
            tablefmt="github",
        ),
        "",
    ]
    bad = [row for row in doc["layers"] if row["problematic"]]
    out += [f"## Problematic layers: {len(bad)}/{s['layers']}", ""]
    if bad:
        out += [
            tabulate(
                [[row["name"], "; ".join(row["issues"])] for row in bad],
                headers=["Layer", "Reasons"],
                tablefmt="github",
            ),
            "",
        ]
    if doc["attribution"]:
        rows = [
            [r["layer"], r["only"]["delta_loss"], r["only"]["kl"], (r["all_but"] or {}).get("delta_loss", math.nan)]
            for r in doc["attribution"]
        ]
        top = [rows[0], *sorted(rows[1:], key=lambda r: r[1], reverse=True)[:10]]
        out += [
            f"## Loss attribution ({doc['evaluation_items']} GSM8K test items; top 10 layers)",
            "",
            tabulate(
                top,
                headers=["Quantized", "Δloss (only this)", "KL (only this)", "Δloss (all but this)"],
                floatfmt="+.4f",
                tablefmt="github",
            ),
            "",
        ]
    out += ["## Recommendation", "", f"**{rec['action']}**: {rec['reason']}.", ""]
    if rec["bf16_layers"]:
        out += [f"- keep in BF16: {', '.join(rec['bf16_layers'])}"]
    if rec["alternative_format"]:
        out += [f"- milder format: {rec['alternative_format']}"]
    if ver:
        out += [
            "",
            "### Verification",
            "",
            tabulate(
                [
                    ["reference", ver["reference_loss"], 0.0],
                    [doc["format"], ver["format_loss"], ver["format_kl"]],
                    [ver["proposal"], ver["proposed_loss"], ver["proposed_kl"]],
                ],
                headers=["Model", "Loss", "KL"],
                floatfmt=".4f",
                tablefmt="github",
            ),
            "",
            f"Recovery of the {doc['format']} loss increase: {ver['recovery']:.1%} "
            f"(on {ver['items']} GSM8K test items).",
        ]
    out += [
        "",
        "Plots: ![SQNR](sqnr.png) ![Deadzone](deadzone.png)"
        + (" ![Attribution](attribution.png)" if doc["attribution"] else ""),
        "",
    ]
    return "\n".join(out)


def _bar_plot(
    path: Path,
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    threshold: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(labels)), 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width=width, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: dict, out_dir: str | Path) -> Path:
    """``summary.md``, ``results.json`` and the PNG plots in ``out_dir``; returns the summary path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    layers = doc["layers"]
    labels = [row["name"].rsplit(".", 1)[-1] for row in layers]
    title = f"{doc['model']} {doc['format']} ({doc['point']})"
    for key, ylabel, tkey in (
        ("sqnr_db", "SQNR (dB)", "sqnr_db"),
        ("deadzone_ratio", "deadzone ratio", "deadzone_ratio"),
    ):
        series = {
            src: [row.get(f"{src}_{key}", math.nan) for row in layers]
            for src in ("weight", "input")
            if any(f"{src}_{key}" in row for row in layers)
        }
        _bar_plot(
            out / f"{key.split('_')[0]}.png",
            f"{title}: per-layer {ylabel}",
            labels,
            series,
            ylabel,
            doc["thresholds"][tkey],
        )
    if doc["attribution"]:
        rows = doc["attribution"][1:]
        _bar_plot(
            out / "attribution.png",
            f"{title}: loss attribution",
            [r["layer"].rsplit(".", 1)[-1] for r in rows],
            {
                "Δloss, only this layer": [r["only"]["delta_loss"] for r in rows],
                "Δloss, all but this layer": [r["all_but"]["delta_loss"] for r in rows],
            },
            "Δ loss",
        )
    summary = out / "summary.md"
    summary.write_text(markdown_summary(doc))
    return summary


COMPARED = [
    ("weight_sqnr_db", False),
    ("input_sqnr_db", False),
    ("weight_deadzone_ratio", True),
    ("input_deadzone_ratio", True),
    ("output_sqnr_db", False),
    ("kurtosis_ratio", False),
]


def compare_scans(a: dict, b: dict) -> str:
    """Markdown: per-layer metrics of scan A vs scan B (e.g. before vs after training, or two formats)."""
    name_a = f"{a['model']}/{a['format']}/{a['point']}"
    name_b = f"{b['model']}/{b['format']}/{b['point']}"
    keys = [(k, pct) for k, pct in COMPARED if any(k in r for r in a["layers"]) and any(k in r for r in b["layers"])]
    rows_b = {r["name"]: r for r in b["layers"]}
    rows = []
    for ra in a["layers"]:
        rb = rows_b.get(ra["name"])
        if rb is None:
            continue
        cells = [ra["name"]]
        for k, pct in keys:
            cells += [_fmt(ra[k], pct), _fmt(rb[k], pct)]
        cells.append(f"{'yes' if ra['problematic'] else 'no'} → {'yes' if rb['problematic'] else 'no'}")
        rows.append(cells)
    headers = ["Layer"] + [f"{k} {side}" for k, _ in keys for side in ("A", "B")] + ["Problematic A → B"]
    sa, sb = a["summary"], b["summary"]
    lines = [
        f"# SRDD comparison: A = {name_a}, B = {name_b}",
        "",
        tabulate(
            [
                ["problematic layers", len(sa["problematic_layers"]), len(sb["problematic_layers"])],
                ["recommendation", sa["recommendation"]["action"], sb["recommendation"]["action"]],
            ],
            headers=["", "A", "B"],
            tablefmt="github",
        ),
        "",
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
    ]
    return "\n".join(lines)


def aqn_markdown(comparison, model: str, problematic: list[str], how: str) -> str:
    """The experiment's §10.3 table with the seed as the unit: loss mean ± sd over seeds per
    strategy, the difference from no AQN and the gap to the unquantized control, each paired by
    seed with its 95 % t CI, p and d_z, "n.s." whenever the seed-level test is not significant."""
    from harness.aqn.train import CONTROL as CONTROL_NAME

    def cell(c: dict | None) -> str:
        if c is None:
            return "-"
        return (
            f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], p={c['p_value']:.3g}, "
            f"d={c['cohens_d']:+.2f}, {'significant' if c['significant'] else 'n.s.'}"
        )

    rows = [
        [r["strategy"], f"{r['mean']:.4f} ± {r['std']:.4f}", cell(r.get("vs_none")), cell(r.get("gap"))]
        for r in comparison.rows()
    ]
    c = comparison
    settings = ", ".join(f"{k} {v}" for k, v in c.settings.items())
    lines = [
        f"# AQN strategy comparison: {model} under {c.fmt} (W4A16), config {c.config}",
        "",
        "What is tested: teacher-forced training (NLL of GSM8K reference answers) of the RMSNorm weights "
        "through a straight-through estimator under W4A16 fake quantization, with AQN noise on the weights. "
        "This is not QeRL's RL, where AQN acts as exploration noise in sampled rollouts.",
        "",
        f"Per run: {settings} (AdamW); seeds {c.seeds} (one run per strategy per seed, the same batches); "
        f"loss = token-weighted answer NLL on {c.eval_items} held-out GSM8K test items, of the quantized model "
        f"(the `{CONTROL_NAME}` control: trained and evaluated without quantization or noise). Before training: "
        f"unquantized {c.untrained_loss:.4f}, quantized {c.untrained_quantized_loss:.4f}. Run time {c.seconds:.0f} s.",
        f"Targeted = {how} ({len(problematic)}): {', '.join(problematic) or 'none'}; healthy = the others."
        if {"targeted", "healthy"} & set(c.strategies)
        else "Targeted / healthy: not run (they need `--attribution` with per-layer attribution CIs).",
        "",
        tabulate(
            rows,
            headers=[
                "Strategy",
                "Loss (mean ± sd over seeds)",
                "vs no AQN: diff [95% CI], p, d",
                f"gap to the {CONTROL_NAME} control: diff [95% CI], p, d",
            ],
            tablefmt="github",
        ),
        "",
        f"Statistics: the seed is the unit (n = {len(c.seeds)} runs per strategy): paired-by-seed t-test and "
        "t CI of the per-seed differences, d = mean / sd of those differences (d_z); item counts do not add "
        "degrees of freedom. The control separates the two effects: its drop from the untrained loss is "
        "adaptation to the data; a strategy's gap to it is the quantization damage left after the same "
        "training; AQN helps only where that gap is significantly smaller than no AQN's.",
    ]
    lines += [f"- note: {n}" for n in c.notes]
    return "\n".join(lines) + "\n"
