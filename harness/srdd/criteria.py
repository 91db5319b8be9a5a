"""From scan sums to per-layer findings and a recommendation (design §5, the experiment's
decision framework §13.3): < 10 % of layers problematic -> ``mixed_precision`` (keep them in
BF16); 10-30 % -> ``mixed_precision_and_aqn``; > 30 % -> ``reconsider_format`` (a milder format;
AQN, if used, global).  No problematic layer -> ``no_action``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from harness.formats import FORMATS, get_format
from harness.srdd.metrics import QuantErrorStats
from harness.srdd.scan import ScanResult, layer_of

SOURCES = ("weight", "input")


@dataclass(frozen=True)
class Thresholds:
    """A layer is problematic when any of these fails (defaults from the experiment's v2 scan)."""

    sqnr_db: float = 20.0  # below
    deadzone_ratio: float = 0.05  # above
    saturation_ratio: float = 0.01  # above
    relative_error: float = 0.10  # above
    kurtosis_ratio: float = 0.9  # quantized / reference, below
    gain_ratio: float = 0.9  # quantized / reference, below

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class LayerFinding:
    name: str
    metrics: dict[str, float]
    issues: list[str] = field(default_factory=list)

    @property
    def problematic(self) -> bool:
        return bool(self.issues)

    def as_dict(self) -> dict:
        return {"name": self.name, **self.metrics, "problematic": self.problematic, "issues": self.issues}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def layer_findings(result: ScanResult, layers: list[str], t: Thresholds) -> list[LayerFinding]:
    """Pool each decoder layer's Linears per source and apply the thresholds."""
    findings = []
    for layer in layers:
        metrics: dict[str, float] = {}
        issues: list[str] = []
        for source in SOURCES:
            pooled = QuantErrorStats()
            members = [
                kinds[source]
                for name, kinds in result.modules.items()
                if source in kinds and layer_of(name, [layer]) == layer
            ]
            for stats in members:
                pooled.merge(stats)
            if not members:
                continue
            m = pooled.as_dict()
            metrics |= {f"{source}_{k}": v for k, v in m.items()}
            if m["sqnr_db"] < t.sqnr_db:
                issues.append(f"{source} SQNR {m['sqnr_db']:.1f} dB < {t.sqnr_db:g} dB")
            if m["deadzone_ratio"] > t.deadzone_ratio:
                issues.append(f"{source} deadzone {m['deadzone_ratio']:.1%} > {t.deadzone_ratio:.0%}")
            if m["saturation_ratio"] > t.saturation_ratio:
                issues.append(f"{source} saturation {m['saturation_ratio']:.2%} > {t.saturation_ratio:.0%}")
            if m["relative_error"] > t.relative_error:
                issues.append(f"{source} relative error {m['relative_error']:.1%} > {t.relative_error:.0%}")
        if layer in result.layer_outputs:
            metrics["output_sqnr_db"] = result.layer_outputs[layer].sqnr_db
            k_ref, k_q = result.kurtosis_ref[layer].kurtosis, result.kurtosis_quant[layer].kurtosis
            metrics |= {"kurtosis_ref": k_ref, "kurtosis_quant": k_q, "kurtosis_ratio": _ratio(k_q, k_ref)}
            if metrics["kurtosis_ratio"] < t.kurtosis_ratio:
                issues.append(f"kurtosis ratio {metrics['kurtosis_ratio']:.2f} < {t.kurtosis_ratio:g}")
        if layer in result.gain_ref:
            g_ref, g_q = result.gain_ref[layer], result.gain_quant[layer]
            metrics |= {"gain_ref": g_ref, "gain_quant": g_q, "gain_ratio": _ratio(g_q, g_ref)}
            if metrics["gain_ratio"] < t.gain_ratio:
                issues.append(f"gain ratio {metrics['gain_ratio']:.2f} < {t.gain_ratio:g}")
        if layer in result.instability:
            metrics["instability"] = result.instability[layer].instability
        for row in result.attribution:
            if row["layer"] == layer:
                metrics |= {
                    "attribution_delta_loss": row["only"]["delta_loss"],
                    "attribution_kl": row["only"]["kl"],
                    "all_but_delta_loss": row["all_but"]["delta_loss"],
                }
        findings.append(LayerFinding(layer, metrics, issues))
    return findings


def milder_format(fmt: str) -> str | None:
    """The cheapest registered format with more mantissa bits (ties: more mantissa bits), or None."""
    here = get_format(fmt)
    better = [
        f
        for f in FORMATS.values()
        if f.element.mbits > here.element.mbits and not f.stochastic and len(f.block_shape) == 1
    ]
    if not better:
        return None
    return min(better, key=lambda f: (f.bits_per_element, -f.element.mbits)).name


@dataclass
class Recommendation:
    action: str
    problematic_share: float
    bf16_layers: list[str]
    aqn_layers: list[str]
    alternative_format: str | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _severity(f: LayerFinding) -> float:
    """Worst first: the layer's own Δloss when attribution ran, else its lowest SQNR."""
    if "attribution_delta_loss" in f.metrics:
        return f.metrics["attribution_delta_loss"]
    return -min(f.metrics.get(f"{s}_sqnr_db", math.inf) for s in SOURCES)


def recommend(findings: list[LayerFinding], fmt: str) -> Recommendation:
    bad = sorted((f for f in findings if f.problematic), key=_severity, reverse=True)
    share = len(bad) / len(findings) if findings else 0.0
    names = [f.name for f in bad]
    if not bad:
        return Recommendation("no_action", 0.0, [], [], None, f"no layer fails a threshold under {fmt}")
    if share < 0.10:
        return Recommendation(
            "mixed_precision",
            share,
            names,
            [],
            None,
            f"{len(bad)}/{len(findings)} layers problematic (< 10 %): keep them in BF16",
        )
    if share <= 0.30:
        worst = names[: max(1, math.ceil(0.1 * len(findings)))]
        return Recommendation(
            "mixed_precision_and_aqn",
            share,
            worst,
            names[len(worst) :],
            None,
            f"{len(bad)}/{len(findings)} layers problematic (10-30 %): BF16 for the worst "
            f"{len(worst)}, targeted AQN for the rest",
        )
    alternative = milder_format(fmt)
    return Recommendation(
        "reconsider_format",
        share,
        [],
        [f.name for f in findings],
        alternative,
        f"{len(bad)}/{len(findings)} layers problematic (> 30 %): try {alternative or 'BF16'}; "
        "AQN, if used, should be global",
    )
