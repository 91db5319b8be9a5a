"""Reports of AQN strategy comparisons (markdown, tabulate; the JSON beside it)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from tabulate import tabulate

from harness import atomic


def aqn_markdown(comparison, model: str, problematic: list[str], how: str) -> str:
    """The strategy table with the seed as the unit: loss mean ± sd over seeds per
    strategy, the difference from no AQN and the gap to the unquantized control, each paired by
    seed with its 95 % t CI, p and d_z, "n.s." whenever the seed-level test is not significant."""
    from harness.aqn.train import CONTROL as CONTROL_NAME

    def cell(c: dict | None) -> str:
        if c is None:
            return "-"
        two_level = c.get("ci_two_level")
        wider = f"; seeds x items [{two_level[0]:+.4f}, {two_level[1]:+.4f}]" if two_level else ""
        return (
            f"{c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]{wider}; MDE {c['mde']:.4f}; "
            f"p={c['p_value']:.3g}, d={c['cohens_d']:+.2f}, {'significant' if c['significant'] else 'n.s.'}"
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
        "What is tested: teacher-forced training (NLL of GSM8K's gold answers) of the RMSNorm weights "
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
                "vs no AQN: diff [95% CI over seeds]; [over seeds x items]; MDE; p, d",
                f"gap to the {CONTROL_NAME} control: diff [95% CI over seeds]; [over seeds x items]; MDE; p, d",
            ],
            tablefmt="github",
        ),
        "",
        f"Statistics: the seed is the unit (n = {len(c.seeds)} runs per strategy): paired-by-seed t-test and "
        f"t CI of the per-seed differences ({len(c.seeds) - 1} degrees of freedom), d = mean / sd of those "
        "differences (d_z); item counts do not add degrees of freedom. The first CI is over seeds and "
        f"conditional on these {c.eval_items} evaluation items (items fixed: what other training runs on the same "
        "items would give); the second is a two-level bootstrap over seeds and items (both resampled, "
        "token-weighted; t on the seeds' degrees of freedom: what other runs on other GSM8K items would give). "
        "MDE: the smallest true difference the seed-level test detects with 80 % power at alpha 0.05 "
        '(two-sided), (t_0.975 + t_0.8) x sd / sqrt(seeds), items fixed; an "n.s." says only that no '
        "difference of that size or larger was there. The control separates the two effects: its drop "
        "from the untrained loss is adaptation to the data; a strategy's gap to it is the quantization "
        "damage left after the same training; AQN helps only where that gap is significantly smaller "
        "than no AQN's.",
    ]
    lines += [f"- note: {n}" for n in c.notes]
    return "\n".join(lines) + "\n"


def report_paths(path: str | Path) -> tuple[Path, Path]:
    """Where a comparison's report goes: the markdown at ``path`` and the JSON beside it (the
    same name with ``.json``), so a ``.json`` name is refused (checked before any training)."""
    out = Path(path)
    if out.suffix == ".json":
        raise ValueError(f"--output {path}: the markdown goes there and the JSON beside it, as .json; use a .md name")
    return out, out.with_suffix(".json")


def write_comparison(path: str | Path, comparison, model: str, problematic: list[str], how: str) -> str:
    """Writes :func:`aqn_markdown` and the comparison as JSON (its rows, every field and the
    report's ``model``, ``targeted`` and ``how``, so :func:`read_comparison` renders it again) to
    :func:`report_paths` of ``path``; returns the markdown."""
    markdown, doc = report_paths(path)
    text = aqn_markdown(comparison, model, problematic, how)
    report = {"model": model, "targeted": list(problematic), "how": how}
    with atomic.Transaction() as tx:  # both files or neither
        tx.file(markdown).write_text(text)
        tx.file(doc).write_text(
            json.dumps({"rows": comparison.rows(), **asdict(comparison), "report": report}, indent=2)
        )
    return text


def read_comparison(path: str | Path) -> tuple[object, str, list[str], str]:
    """``(comparison, model, targeted, how)`` from a :func:`write_comparison` JSON, the arguments
    :func:`aqn_markdown` renders (the rows are recomputed from the per-seed values)."""
    from harness.aqn.train import StrategyComparison

    doc = json.loads(Path(path).read_text())
    names = {f.name for f in fields(StrategyComparison)}
    report = doc.get("report") or {}
    try:
        comparison = StrategyComparison(**{k: v for k, v in doc.items() if k in names})
        return comparison, report["model"], report["targeted"], report["how"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an `aqn compare --output` JSON with its report settings ({err!r})") from err
