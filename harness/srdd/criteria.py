"""From scan sums to per-layer findings and a recommendation.

A layer is problematic because it is worse than it should be, never because the format is coarse.
Rules, each named in the finding's reasons with its evidence:

- ``floor``: a target weight's detector is worse than the format's own floor for that tensor (a
  seeded i.i.d. Gaussian tensor of its shape and RMS, ``harness.srdd.floors``) by more than
  ``Rules.floor_factor`` (error energy for SQNR, the ratio for relative error; for the counted
  ratios, deadzone and saturation, also beyond 4 binomial standard errors of the floor's rate).
  Activations are heavy-tailed by nature, so their floor is reported but never judged.
- ``outlier``: a per-layer metric is an outlier among the model's layers: robust z
  ``0.6745·(v − median)/MAD`` above ``Rules.outlier_z`` (3.5, Iglewicz & Hoaglin 1993) in the
  bad direction *and* worse than the median layer by ``Rules.outlier_factor`` (an effect-size
  guard: with near-identical layers the MAD → 0 and z alone would flag noise).  Needs at least
  ``Rules.min_layers`` layers.  Applies to the weight excesses, activation metrics (input
  detectors, layer-output error, activation-aware output error, kurtosis ratio, massive
  activation, residual gain) and attribution KL.
- ``attribution``: quantizing the layer alone raises the loss beyond noise (its exact Δloss CI
  over items excludes 0, above) *and* its KL is an outlier among the layers (every layer of a
  4-bit model costs something; the question is which cost more than the others).  With the
  two-stage attribution (``harness.srdd.sensitivity``) only the layers it ran exactly can be
  flagged: their exact KL is tested against all layers' KL, the screen's estimates standing in
  for the layers without an exact row (a noisy estimate widens the MAD: conservative).
- ``threshold``: an absolute threshold given explicitly (``Thresholds``; all off by default).
- ``non-finite``: NaN/Inf in a weight, an activation, a layer output or the attribution loss.

Decision framework (by the share of problematic layers): < 10 % of layers problematic -> ``mixed_precision``
(keep them in BF16); 10-30 % -> ``mixed_precision_and_aqn``; > 30 % -> ``reconsider_format`` (a
milder format; AQN, if used, global); none -> ``no_action``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from harness.formats import FORMATS, get_format
from harness.srdd.attribution import Attribution
from harness.srdd.floors import FLOOR_METRICS, excess
from harness.srdd.metrics import OutputErrorStats, QuantErrorStats
from harness.srdd.scan import ScanResult, layer_of
from harness.srdd.sensitivity import Screened

SOURCES = ("weight", "input")
ROBUST_Z_SCALE = 0.6745  # Φ⁻¹(0.75): makes MAD a consistent estimator of σ for Gaussian data
MEAN_AD_SCALE = 1.253314  # √(π/2): the same for the mean absolute deviation (MAD = 0 fallback)


@dataclass(frozen=True)
class Rules:
    """The relative rules' parameters (module docstring)."""

    floor_factor: float = 2.0  # error twice the Gaussian floor's (3 dB for SQNR)
    outlier_z: float = 3.5
    outlier_factor: float = 1.25
    min_layers: int = 5

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    """Absolute thresholds, each off (None) unless given: fixed values such as
    SQNR 20 dB, deadzone 5 %, saturation 1 %, relative error 10 %, ratios 0.9 — values MXFP4
    fails on any data, which is why they are not defaults."""

    sqnr_db: float | None = None  # below
    deadzone_ratio: float | None = None  # above
    saturation_ratio: float | None = None  # above
    relative_error: float | None = None  # above
    kurtosis_ratio: float | None = None  # quantized / reference, below
    gain_ratio: float | None = None  # quantized / reference, below

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass
class Reason:
    """Why a layer is flagged: the rule, the metric and tensor it looked at, the evidence."""

    rule: str
    metric: str
    tensor: str
    evidence: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.tensor} {self.metric}: {self.evidence}"


@dataclass
class LayerFinding:
    name: str
    metrics: dict[str, float]
    reasons: list[Reason] = field(default_factory=list)

    @property
    def problematic(self) -> bool:
        return bool(self.reasons)


def robust_z(values: dict[str, float]) -> dict[str, float]:
    """``0.6745·(v − median)/MAD`` of each finite value (MAD = 0: the mean absolute deviation
    scaled by √(π/2)/0.6745 instead; both 0: z = 0)."""
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if not finite:
        return {}
    med = statistics.median(finite.values())
    dev = [abs(v - med) for v in finite.values()]
    mad = statistics.median(dev)
    if mad > 0:
        scale = mad / ROBUST_Z_SCALE
    else:
        scale = MEAN_AD_SCALE * statistics.fmean(dev)
    return {k: (v - med) / scale if scale > 0 else 0.0 for k, v in finite.items()}


def outliers(values: dict[str, float], rules: Rules, guard: Callable[[float, float], bool]) -> dict[str, float]:
    """Names whose value is a high outlier (``robust_z > rules.outlier_z``) and passes the effect
    ``guard(value, median)``; name -> z."""
    if sum(math.isfinite(v) for v in values.values()) < rules.min_layers:
        return {}
    med = statistics.median(v for v in values.values() if math.isfinite(v))
    return {k: z for k, z in robust_z(values).items() if z > rules.outlier_z and guard(values[k], med)}


def _pooled(stats: list[QuantErrorStats]) -> QuantErrorStats:
    total = QuantErrorStats()
    for s in stats:
        total.merge(s)
    return total


def _log_ratio(a: float, b: float) -> float:
    """|log(a/b)|: how far a quantized/reference ratio is from 1, in either direction."""
    return abs(math.log(a / b)) if a > 0 and b > 0 else math.nan


def floor_failure(metric: str, stats: QuantErrorStats, floor: QuantErrorStats, rules: Rules) -> str | None:
    """The evidence when ``stats`` is worse than its Gaussian ``floor`` by the floor rule, else None."""
    value, ref = getattr(stats, metric), getattr(floor, metric)
    if metric in ("deadzone_ratio", "saturation_ratio"):
        n = stats.nonzero if metric == "deadzone_ratio" else stats.count
        allowance = rules.floor_factor * ref + 4 * math.sqrt(max(ref, 1 / max(n, 1)) / max(n, 1))
        if value > allowance:
            return f"{value:.2%} vs Gaussian floor {ref:.2%} (allowed up to {allowance:.2%})"
        return None
    factor = excess(metric, value, ref)
    if factor > rules.floor_factor:
        unit = "dB" if metric == "sqnr_db" else ""
        shown = f"{value:.2f} {unit} vs Gaussian floor {ref:.2f} {unit}".replace("  ", " ")
        return f"{shown}: error {factor:.2f}x the floor's (> {rules.floor_factor:g}x)"
    return None


def _layer_metrics(result: ScanResult, layer: str, members: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for source in SOURCES:
        stats = [result.modules[m][source] for m in members if source in result.modules.get(m, {})]
        if not stats:
            continue
        pooled = _pooled(stats)
        floor = _pooled([result.floors[m][source] for m in members if source in result.floors.get(m, {})])
        for metric in FLOOR_METRICS:
            value, ref = getattr(pooled, metric), getattr(floor, metric)
            metrics |= {
                f"{source}_{metric}": value,
                f"{source}_{metric}_floor": ref,
                f"{source}_{metric}_excess": excess(metric, value, ref),
            }
        metrics[f"{source}_clip_share"] = pooled.clip_share
    errors = [result.output_error[m] for m in members if m in result.output_error]
    if errors:
        total = OutputErrorStats(sum(e.error for e in errors), sum(e.output for e in errors))
        metrics["output_error"] = total.output_error
    if layer in result.layer_outputs:
        metrics["output_sqnr_db"] = result.layer_outputs[layer].sqnr_db
        k_ref, k_q = result.kurtosis_ref[layer].kurtosis, result.kurtosis_quant[layer].kurtosis
        metrics |= {"kurtosis_ref": k_ref, "kurtosis_quant": k_q, "kurtosis_ratio": k_q / k_ref if k_ref else math.nan}
        p_ref, p_q = result.peak_ref[layer], result.peak_quant[layer]
        metrics |= {
            "massive_ref": p_ref.value,
            "massive_quant": p_q.value,
            "massive_ratio": p_q.value / p_ref.value if p_ref.value else math.nan,
            "massive_position": p_ref.position,
            "massive_dim": p_ref.dim,
        }
    if layer in result.gain_ref:
        g_ref, g_q = result.gain_ref[layer], result.gain_quant[layer]
        metrics |= {"gain_ref": g_ref, "gain_quant": g_q, "gain_ratio": g_q / g_ref if g_ref else math.nan}
    if layer in result.instability:
        metrics["instability"] = result.instability[layer].instability
    return metrics


# Per-layer metrics judged against the other layers: (metric, badness transform, guard, label).
_OUTLIER_METRICS: list[tuple[str, Callable[[dict], float], str]] = [
    *[(f"weight_{m}_excess", lambda d, m=m: d.get(f"weight_{m}_excess", math.nan), "x floor") for m in FLOOR_METRICS],
    ("input_sqnr_db", lambda d: 10 ** (-d.get("input_sqnr_db", math.nan) / 10), "noise/signal"),
    ("input_deadzone_ratio", lambda d: d.get("input_deadzone_ratio", math.nan), ""),
    ("input_saturation_ratio", lambda d: d.get("input_saturation_ratio", math.nan), ""),
    ("input_relative_error", lambda d: d.get("input_relative_error", math.nan), ""),
    ("output_error", lambda d: d.get("output_error", math.nan), ""),
    ("output_sqnr_db", lambda d: 10 ** (-d.get("output_sqnr_db", math.nan) / 10), "noise/signal"),
]
_LOG_RATIO_METRICS = [
    ("kurtosis_ratio", "kurtosis_quant", "kurtosis_ref"),
    ("massive_ratio", "massive_quant", "massive_ref"),
    ("gain_ratio", "gain_quant", "gain_ref"),
]


def _nonfinite_reasons(result: ScanResult, layer: str, members: list[str]) -> list[Reason]:
    reasons = []
    for m in members:
        for kind, stats in result.modules.get(m, {}).items():
            if stats.nonfinite:
                evidence = f"{stats.nonfinite} NaN/Inf values"
                reasons.append(
                    Reason("non-finite", kind, f"{m}.{kind}" if kind == "weight" else f"{m} {kind}", evidence)
                )
    out = result.layer_outputs.get(layer)
    if out is not None and out.nonfinite:
        reasons.append(Reason("non-finite", "output", f"{layer} output", f"{out.nonfinite} NaN/Inf values"))
    return reasons


def layer_findings(
    result: ScanResult,
    layers: list[str],
    thresholds: Thresholds | None = None,
    rules: Rules | None = None,
    attribution: list[Attribution] = (),
    screen: list[Screened] = (),
) -> list[LayerFinding]:
    """Per decoder layer: its metrics (weights and inputs pooled over its Linears, with their
    Gaussian floors) and the reasons the rules (module docstring) flag it."""
    thresholds, rules = thresholds or Thresholds(), rules or Rules()
    members = {layer: [m for m in result.modules if layer_of(m, [layer]) == layer] for layer in layers}
    findings = {layer: LayerFinding(layer, _layer_metrics(result, layer, members[layer])) for layer in layers}
    for layer, finding in findings.items():
        finding.reasons += _nonfinite_reasons(result, layer, members[layer])
        for m in members[layer]:
            if "weight" in result.modules[m] and "weight" in result.floors.get(m, {}):
                for metric in FLOOR_METRICS:
                    evidence = floor_failure(metric, result.modules[m]["weight"], result.floors[m]["weight"], rules)
                    if evidence:
                        finding.reasons.append(Reason("floor", metric, f"{m}.weight", evidence))
    for metric, badness, _ in _OUTLIER_METRICS:
        values = {layer: badness(f.metrics) for layer, f in findings.items()}
        for layer, z in outliers(values, rules, lambda v, med: v > rules.outlier_factor * med).items():
            m = findings[layer].metrics[metric]
            findings[layer].reasons.append(Reason("outlier", metric, layer, f"{m:.4g}, robust z {z:.1f} among layers"))
    for metric, quant, ref in _LOG_RATIO_METRICS:
        values = {
            layer: _log_ratio(f.metrics.get(quant, math.nan), f.metrics.get(ref, math.nan))
            for layer, f in findings.items()
        }
        for layer, z in outliers(values, rules, lambda v, med: v > math.log(rules.outlier_factor)).items():
            m = findings[layer].metrics[metric]
            findings[layer].reasons.append(
                Reason("outlier", metric, layer, f"quantized/reference {m:.3g}, robust z {z:.1f} among layers")
            )
    _attribution_reasons(findings, attribution, rules, screen)
    _threshold_reasons(findings, thresholds)
    return [findings[layer] for layer in layers]


def _attribution_reasons(
    findings: dict[str, LayerFinding], rows: list[Attribution], rules: Rules, screen: list[Screened]
) -> None:
    per_layer = [r for r in rows if r.layer in findings]
    for r in screen:
        findings[r.layer].metrics["screen_kl"] = r.kl
    for r in rows:
        if r.layer in findings:
            lo, hi = r.ci
            findings[r.layer].metrics |= {
                "attribution_delta_loss": r.delta_loss,
                "attribution_ci_low": lo,
                "attribution_ci_high": hi,
                "attribution_kl": r.kl,
            }
        if not all(math.isfinite(x) for x in (*r.delta_loss_items, *r.kl_items)):
            target = findings.get(r.layer)
            for f in [target] if target else findings.values():
                f.reasons.append(
                    Reason("non-finite", "loss", f"{r.layer} quantized", "NaN/Inf in the answer loss or KL")
                )
    kl = {r.layer: r.kl for r in screen} | {r.layer: r.kl for r in per_layer}  # exact where it ran
    high = outliers(kl, rules, lambda v, med: v > rules.outlier_factor * med)
    among = "layers, screen estimates where not exact" if screen else "layers"
    for r in per_layer:
        if r.harmful and r.layer in high:
            lo, hi = r.ci
            findings[r.layer].reasons.append(
                Reason(
                    "attribution",
                    "kl",
                    r.layer,
                    f"KL {r.kl:.4g} (robust z {high[r.layer]:.1f} among {among}), "
                    f"Δloss {r.delta_loss:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}] over {len(r.delta_loss_items)} items",
                )
            )


def _threshold_reasons(findings: dict[str, LayerFinding], t: Thresholds) -> None:
    checks = [(f"{s}_{k}", getattr(t, k), k == "sqnr_db") for s in SOURCES for k in FLOOR_METRICS]
    checks += [("kurtosis_ratio", t.kurtosis_ratio, True), ("gain_ratio", t.gain_ratio, True)]
    for f in findings.values():
        for key, limit, below in checks:
            if limit is None or key not in f.metrics:
                continue
            v = f.metrics[key]
            if (v < limit) if below else (v > limit):
                sign = "<" if below else ">"
                f.reasons.append(Reason("threshold", key, f.name, f"{v:.4g} {sign} {limit:g} (explicit threshold)"))


def milder_format(fmt: str) -> str | None:
    """The cheapest registered block format (MX / NVFP4) with more mantissa bits (ties: more
    mantissa bits), or None."""
    here = get_format(fmt)
    better = [
        f
        for f in FORMATS.values()
        if f.element.mbits > here.element.mbits and not f.stochastic and len(f.block_shape) == 1 and f.microscaling
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


def _severity(f: LayerFinding) -> tuple[float, float]:
    """Worst first: attribution KL when attribution ran, then the number of reasons."""
    return (f.metrics.get("attribution_kl", -math.inf), len(f.reasons))


def recommend(findings: list[LayerFinding], fmt: str) -> Recommendation:
    bad = sorted((f for f in findings if f.problematic), key=_severity, reverse=True)
    share = len(bad) / len(findings) if findings else 0.0
    names = [f.name for f in bad]
    if not bad:
        return Recommendation("no_action", 0.0, [], [], None, f"no layer is worse than expected under {fmt}")
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
