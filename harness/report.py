"""Reports of AQN strategy comparisons (markdown, tabulate).  SRDD's reports live with SRDD:
``harness.srdd.report``."""

from __future__ import annotations

from tabulate import tabulate


def aqn_markdown(comparison, model: str, problematic: list[str], how: str) -> str:
    """The experiment's §10.3 table: loss mean ± std per strategy, vs no AQN and vs global AQN
    with paired p-values (per held-out item, averaged over seeds) and Cohen's d."""
    rows = []
    for r in comparison.rows():

        def rel(label: str, r=r) -> str:
            if f"{label}_pct" not in r:
                return "-"
            verdict = "significant" if r[f"{label}_significant"] else "not significant"
            return f"{r[f'{label}_pct']:+.2f}% (p={r[f'{label}_p']:.3g}, d={r[f'{label}_d']:+.2f}, {verdict})"

        rows.append([r["strategy"], f"{r['mean']:.4f} ± {r['std']:.4f}", rel("vs_none"), rel("vs_global")])
    lines = [
        f"# AQN strategy comparison: {model} under {comparison.fmt} (W4A16), config {comparison.config}",
        "",
        f"{comparison.steps} training steps (trainable RMSNorm weights, AdamW, straight-through W4A16) per run, "
        f"seeds {comparison.seeds}; loss = answer-token NLL of the quantized model on held-out GSM8K test items "
        f"(untrained quantized model: {comparison.reference_loss:.4f}); run time {comparison.seconds:.0f} s.",
        f"Targeted = {how} ({len(problematic)}): {', '.join(problematic) or 'none'}; healthy = the others.",
        "",
        tabulate(
            rows, headers=["Strategy", "Loss (mean ± std over seeds)", "vs no AQN", "vs global AQN"], tablefmt="github"
        ),
        "",
        "p-values: paired t-test over held-out items (per-item loss averaged over seeds); a difference "
        "with n < 30 items is never called significant.",
    ]
    lines += [f"- note: {n}" for n in comparison.notes]
    return "\n".join(lines) + "\n"
