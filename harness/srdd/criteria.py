"""From scan sums and the loss attribution to per-layer findings and a recommendation.

Direct evidence decides, detectors explain.  A layer is **problematic** when one of these rules
fires, each named in the finding's reasons with its evidence:

- ``attribution``: quantizing the layer alone raises the loss beyond the negligible band (its
  exact Δloss CI over items lies above +δ, ``Rules.negligible_delta``; label ``harmful``,
  ``harness.srdd.attribution.label``) *and* it is an outlier among the layers by log KL or log
  Δloss: robust z ``0.6745·(v − median)/MAD`` of the logs (Iglewicz & Hoaglin 1993) above a
  threshold calibrated to the number of layers (``outlier_threshold``: the family-wise level
  ``Rules.outlier_alpha`` for i.i.d. log-normal layers, never below ``Rules.outlier_z``), with an
  effect-size guard (worse than ``Rules.outlier_factor`` × the median layer).  KL is positive and
  right-skewed, so a z on its raw values flags clean models; on the log scale it is close to
  Gaussian.  Without an exact row a layer cannot be flagged by this rule; screen estimates stand
  in for missing layers in the median and MAD only.
- ``floor``: a target weight's detector is worse than the format's own floor for that tensor (a
  seeded i.i.d. Gaussian tensor of its shape and RMS, ``harness.srdd.floors``) by more than
  ``Rules.floor_factor`` (error energy for SQNR, the ratio for relative error; for the counted
  ratios, deadzone and saturation, also beyond 4 standard errors of the difference of the two
  binomial rates, the tensor's and its floor tensor's):
  a property of that weight, not of upstream error.
- ``threshold``: an absolute threshold given explicitly (``Thresholds``; all off by default).
- ``non-finite``: NaN/Inf in a weight, an activation, a layer output or the attribution loss.

The activation detectors are **local** (the layer quantized alone on its reference input) and
never flag a layer: an outlier among the layers (robust z > ``Rules.outlier_z`` and worse than
``Rules.outlier_factor`` × the median; for quantized/reference ratios, |log r| above that factor
times the median |log r|) only *points at* the layer, so that the two-stage attribution gives it
an exact row (``LayerFinding.pointers``).  The cumulative curves (the fully quantized model)
show how error grows with depth and are reported as plots only.  Every problematic layer gets a
``why`` from its Linears' local detectors (``explain``).

Decision framework (by the share of problematic layers): < 10 % of layers problematic -> ``mixed_precision``;
10-30 % -> ``mixed_precision_and_aqn``; > 30 % -> ``reconsider_format`` (a milder format; AQN, if
used, global); none -> ``spread_harm`` when some layers are ``harmful`` (the cost is spread: the
most harmful in BF16 is still proposed, and verified against chance), else ``no_action``.
Which layers stay in BF16 is decided by the exact attributed harm (``recommend``): the harmful
layers in decreasing exact Δloss, greedily, as many as the framework says or as fit a
bits-per-weight budget; a layer that is not ``harmful`` is never kept in BF16 nor targeted by AQN.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.formats import FORMATS, get_format
from harness.srdd.attribution import NEGLIGIBLE_DELTA, Attribution, Label
from harness.srdd.floors import FLOOR_METRICS, excess
from harness.srdd.metrics import OutputErrorStats, QuantErrorStats
from harness.srdd.scan import ScanResult, layer_of
from harness.srdd.sensitivity import Screened

SOURCES = ("weight", "input")
ROBUST_Z_SCALE = 0.6745  # Φ⁻¹(0.75): makes MAD a consistent estimator of σ for Gaussian data
MEAN_AD_SCALE = 1.253314  # √(π/2): the same for the mean absolute deviation (MAD = 0 fallback)
BF16_BITS = 16.0


@dataclass(frozen=True)
class Rules:
    """The relative rules' parameters (module docstring)."""

    floor_factor: float = 2.0  # error twice the Gaussian floor's (3 dB for SQNR)
    outlier_z: float = 3.5
    outlier_factor: float = 1.25
    outlier_alpha: float = 0.01  # family-wise, per attribution metric, for exchangeable layers
    negligible_delta: float = NEGLIGIBLE_DELTA
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
    kurtosis_ratio: float | None = None  # quantized / reference (local), below
    gain_ratio: float | None = None  # quantized / reference, below

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass
class Reason:
    """Why a layer is flagged (or, for a pointer, why it got an exact row): the rule, the metric
    and tensor it looked at, the evidence."""

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
    pointers: list[Reason] = field(default_factory=list)  # local detectors that point at it (no verdict)
    why: list[str] = field(default_factory=list)  # its Linears' local detectors, when problematic
    label: str | None = None  # the exact attribution's label (harness.srdd.attribution.Label)

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


@functools.lru_cache(maxsize=256)
def outlier_threshold(n: int, alpha: float, draws: int = 20_000, seed: int = 0) -> float:
    """The (1 − ``alpha``) quantile of the largest :func:`robust_z` among ``n`` i.i.d. Gaussian
    values (seeded Monte Carlo, ``draws`` samples): a z above it happens to *some* layer of ``n``
    exchangeable layers with probability ``alpha``.  The median/MAD of few values is itself
    noisy, so the bound is far above 3.5 for small ``n`` (about 7.9 at n = 6 for alpha = 0.01)."""
    x = np.random.default_rng(seed).standard_normal((draws, n))
    med = np.median(x, axis=1, keepdims=True)
    mad = np.median(np.abs(x - med), axis=1, keepdims=True)
    return float(np.quantile((ROBUST_Z_SCALE * (x - med) / mad).max(axis=1), 1 - alpha))


def outliers(
    values: dict[str, float], rules: Rules, guard: Callable[[float, float], bool], z_limit: float | None = None
) -> dict[str, float]:
    """Names whose value is a high outlier (``robust_z > z_limit``, default ``rules.outlier_z``)
    and passes the effect ``guard(value, median)``; name -> z."""
    if sum(math.isfinite(v) for v in values.values()) < rules.min_layers:
        return {}
    limit = rules.outlier_z if z_limit is None else z_limit
    med = statistics.median(v for v in values.values() if math.isfinite(v))
    return {k: z for k, z in robust_z(values).items() if z > limit and guard(values[k], med)}


def log_outliers(values: dict[str, float], rules: Rules) -> dict[str, float]:
    """High outliers on the log scale among the positive ``values`` (non-positive ones are left
    out), at the calibrated threshold ``max(outlier_z, outlier_threshold(n, outlier_alpha))`` and
    with the guard value > ``outlier_factor`` × median; name -> z."""
    logs = {k: math.log(v) for k, v in values.items() if math.isfinite(v) and v > 0}
    if len(logs) < rules.min_layers:
        return {}
    limit = max(rules.outlier_z, outlier_threshold(len(logs), rules.outlier_alpha))
    return outliers(logs, rules, lambda v, med: v > med + math.log(rules.outlier_factor), limit)


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
        # two binomial samples (the tensor and its floor tensor): 4 standard errors of their
        # difference at the pooled rate (at least one count), beyond floor_factor x the floor's rate
        n = max(stats.nonzero if metric == "deadzone_ratio" else stats.count, 1)
        n_f = max(floor.nonzero if metric == "deadzone_ratio" else floor.count, 1)
        pooled = max((value * n + ref * n_f) / (n + n_f), 1 / (n + n_f))
        allowance = rules.floor_factor * ref + 4 * math.sqrt(pooled * (1 / n + 1 / n_f))
        if value > allowance:
            return f"{value:.2%} vs Gaussian floor {ref:.2%} (allowed up to {allowance:.2%})"
        return None
    factor = excess(metric, value, ref)
    if factor > rules.floor_factor:
        unit = "dB" if metric == "sqnr_db" else ""
        shown = f"{value:.2f} {unit} vs Gaussian floor {ref:.2f} {unit}".replace("  ", " ")
        return f"{shown}: error {factor:.2f}x the floor's (> {rules.floor_factor:g}x)"
    return None


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


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
    shapes = [result.module_shapes[m] for m in members if m in result.module_shapes]
    if shapes:
        metrics["weight_params"] = float(sum(math.prod(s) for s in shapes))
    errors = [result.output_error[m] for m in members if m in result.output_error]
    if errors:
        total = OutputErrorStats(sum(e.error for e in errors), sum(e.output for e in errors))
        metrics["output_error"] = total.output_error
    if layer in result.layer_outputs:
        k_ref, k_q = result.kurtosis_ref[layer].kurtosis, result.kurtosis_quant[layer].kurtosis
        p_ref, p_q = result.peak_ref[layer], result.peak_quant[layer]
        metrics |= {
            "output_sqnr_db": result.layer_outputs[layer].sqnr_db,  # cumulative: a plot, not a verdict
            "kurtosis_ref": k_ref,
            "kurtosis_quant": k_q,
            "kurtosis_ratio": _ratio(k_q, k_ref),
            "massive_ref": p_ref.value,
            "massive_quant": p_q.value,
            "massive_ratio": _ratio(p_q.value, p_ref.value),
            "massive_position": p_ref.position,
            "massive_dim": p_ref.dim,
        }
    if layer in result.local_outputs:
        k_loc, p_loc = result.local_kurtosis[layer].kurtosis, result.local_peak[layer].value
        metrics |= {
            "local_output_sqnr_db": result.local_outputs[layer].sqnr_db,
            "local_kurtosis_quant": k_loc,
            "local_kurtosis_ratio": _ratio(k_loc, metrics["kurtosis_ref"]),
            "local_massive_quant": p_loc,
            "local_massive_ratio": _ratio(p_loc, metrics["massive_ref"]),
        }
    if layer in result.gain_ref:
        g_ref, g_q = result.gain_ref[layer], result.gain_quant[layer]
        metrics |= {"gain_ref": g_ref, "gain_quant": g_q, "gain_ratio": _ratio(g_q, g_ref)}
    if layer in result.instability:
        metrics["instability"] = result.instability[layer].instability
    return metrics


# Local per-layer detectors judged against the other layers, to point at layers: (metric, badness).
_POINTER_METRICS: list[tuple[str, Callable[[dict], float]]] = [
    *[(f"weight_{m}_excess", lambda d, m=m: d.get(f"weight_{m}_excess", math.nan)) for m in FLOOR_METRICS],
    ("input_sqnr_db", lambda d: 10 ** (-d.get("input_sqnr_db", math.nan) / 10)),
    ("input_deadzone_ratio", lambda d: d.get("input_deadzone_ratio", math.nan)),
    ("input_saturation_ratio", lambda d: d.get("input_saturation_ratio", math.nan)),
    ("input_relative_error", lambda d: d.get("input_relative_error", math.nan)),
    ("output_error", lambda d: d.get("output_error", math.nan)),
    ("local_output_sqnr_db", lambda d: 10 ** (-d.get("local_output_sqnr_db", math.nan) / 10)),
]
_LOG_RATIO_METRICS = [  # quantized/reference ratios, local
    ("local_kurtosis_ratio", "local_kurtosis_quant", "kurtosis_ref"),
    ("local_massive_ratio", "local_massive_quant", "massive_ref"),
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
    for where, outputs in (("output", result.local_outputs), ("output (cumulative)", result.layer_outputs)):
        out = outputs.get(layer)
        if out is not None and out.nonfinite:
            reasons.append(Reason("non-finite", "output", f"{layer} {where}", f"{out.nonfinite} NaN/Inf values"))
            break
    return reasons


def layer_findings(
    result: ScanResult,
    layers: list[str],
    thresholds: Thresholds | None = None,
    rules: Rules | None = None,
    attribution: Sequence[Attribution] = (),
    screen: Sequence[Screened] = (),
) -> list[LayerFinding]:
    """Per decoder layer: its metrics (weights and inputs pooled over its Linears, with their
    Gaussian floors; local and cumulative outputs), the reasons the rules (module docstring) flag
    it, the local detectors that point at it, and for a problematic layer the ``why``."""
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
    for metric, badness in _POINTER_METRICS:
        values = {layer: badness(f.metrics) for layer, f in findings.items()}
        for layer, z in outliers(values, rules, lambda v, med: v > rules.outlier_factor * med).items():
            m = findings[layer].metrics[metric]
            findings[layer].pointers.append(
                Reason("detector", metric, layer, f"{m:.4g}, robust z {z:.1f} among layers")
            )
    for metric, quant, ref in _LOG_RATIO_METRICS:
        values = {
            layer: _log_ratio(f.metrics.get(quant, math.nan), f.metrics.get(ref, math.nan))
            for layer, f in findings.items()
        }
        for layer, z in outliers(values, rules, lambda v, med: v > rules.outlier_factor * med).items():
            m = findings[layer].metrics[metric]
            findings[layer].pointers.append(
                Reason("detector", metric, layer, f"quantized/reference {m:.3g}, robust z {z:.1f} among layers")
            )
    _attribution_reasons(findings, attribution, rules, screen)
    _threshold_reasons(findings, thresholds)
    for layer, finding in findings.items():
        if finding.problematic:
            finding.why = explain(result, members[layer])
    return [findings[layer] for layer in layers]


def pointed_at(findings: Sequence[LayerFinding]) -> list[str]:
    """The layers a detector points at or a non-attribution rule flags: what the two-stage
    attribution must run exactly."""
    return [f.name for f in findings if f.pointers or f.reasons]


def explain(result: ScanResult, members: Sequence[str], top: int = 3) -> list[str]:
    """The ``top`` Linears of a layer with the largest local error (activation-aware output error
    when weights were quantized, else weight or input error energy over its Gaussian floor), each
    with its deadzone, clipping share and largest |w| over RMS against its floor."""
    rows = []
    for m in members:
        kinds = result.modules.get(m, {})
        source = "weight" if "weight" in kinds else "input" if "input" in kinds else None
        if source is None:
            continue
        stats, floor = kinds[source], result.floors.get(m, {}).get(source)
        err = result.output_error[m].output_error if m in result.output_error else math.nan
        ratio = excess("sqnr_db", stats.sqnr_db, floor.sqnr_db) if floor else math.nan
        parts = [f"output error {err:.3g}"] if math.isfinite(err) else []
        parts.append(f"{source} error {ratio:.2f}x its Gaussian floor's")
        dz_floor = f" (floor {floor.deadzone_ratio:.1%})" if floor else ""
        parts.append(f"deadzone {stats.deadzone_ratio:.1%}{dz_floor}")
        parts.append(f"clipping {stats.clip_share:.1%} of the error")
        if source == "weight" and m in result.weight_peak:
            parts.append(f"max |w| {result.weight_peak[m]:.1f}x RMS")
        key = err if math.isfinite(err) else ratio
        rows.append((-key if math.isfinite(key) else math.inf, f"{short_name(m)}: " + ", ".join(parts)))
    return [text for _, text in sorted(rows)[:top]]


def short_name(module: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj``."""
    match = re.search(r"\.\d+\.(.+)$", module)
    return match.group(1) if match else module


def _attribution_reasons(
    findings: dict[str, LayerFinding], rows: Sequence[Attribution], rules: Rules, screen: Sequence[Screened]
) -> None:
    per_layer = [r for r in rows if r.layer in findings]
    for r in screen:
        findings[r.layer].metrics["screen_kl"] = r.kl
        findings[r.layer].metrics["screen_delta_loss"] = r.delta_loss
    for r in rows:
        if r.layer in findings:
            lo, hi = r.ci
            findings[r.layer].metrics |= {
                "attribution_delta_loss": r.delta_loss,
                "attribution_ci_low": lo,
                "attribution_ci_high": hi,
                "attribution_kl": r.kl,
            }
            findings[r.layer].label = r.label(rules.negligible_delta).value
        if not all(math.isfinite(x) for x in (*r.delta_loss_items, *r.kl_items)):
            target = findings.get(r.layer)
            for f in [target] if target else findings.values():
                f.reasons.append(
                    Reason("non-finite", "loss", f"{r.layer} quantized", "NaN/Inf in the answer loss or KL")
                )
    # exact where it ran, screen estimates standing in for the others
    kl = {r.layer: r.kl for r in screen} | {r.layer: r.kl for r in per_layer}
    delta = {r.layer: r.delta_loss for r in screen} | {r.layer: r.delta_loss for r in per_layer}
    high = {"kl": log_outliers(kl, rules), "Δloss": log_outliers(delta, rules)}
    among = "layers, screen estimates where not exact" if screen else "layers"
    for r in per_layer:
        hits = [f"log {name} robust z {found[r.layer]:.1f}" for name, found in high.items() if r.layer in found]
        if r.label(rules.negligible_delta) is Label.HARMFUL and hits:
            lo, hi = r.ci
            findings[r.layer].reasons.append(
                Reason(
                    "attribution",
                    "kl" if r.layer in high["kl"] else "delta_loss",
                    r.layer,
                    f"Δloss {r.delta_loss:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}] over {len(r.delta_loss_items)} items "
                    f"(> δ = {rules.negligible_delta:g}), KL {r.kl:.4g}; {', '.join(hits)} among {among}",
                )
            )


def _threshold_reasons(findings: dict[str, LayerFinding], t: Thresholds) -> None:
    checks = [(f"{s}_{k}", getattr(t, k), k == "sqnr_db") for s in SOURCES for k in FLOOR_METRICS]
    checks += [("local_kurtosis_ratio", t.kurtosis_ratio, True), ("gain_ratio", t.gain_ratio, True)]
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
    predicted_recovery: float | None = None  # Σ exact Δloss of the BF16 layers / Δloss of all layers
    bits_per_weight: float | None = None  # the model's average over the quantized Linears' weights
    budget_bits: float | None = None


def _index(name: str) -> tuple[int, str]:
    """Model order from the name alone (``model.layers.12`` -> 12), so that no ranking depends on
    the order of the findings."""
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)


def _ranked(findings: Sequence[LayerFinding], attributed: bool) -> list[LayerFinding]:
    """Candidates for BF16, worst first.  With attribution: the ``harmful`` layers by exact Δloss;
    without: the problematic layers by their number of reasons (no direct evidence of harm)."""
    if attributed:
        harmful = [f for f in findings if f.label == Label.HARMFUL.value]
        return sorted(harmful, key=lambda f: (-f.metrics["attribution_delta_loss"], _index(f.name)))
    bad = [f for f in findings if f.problematic]
    return sorted(bad, key=lambda f: (-len(f.reasons), _index(f.name)))


def bits_per_weight(findings: Sequence[LayerFinding], fmt: str, bf16: Sequence[str]) -> float | None:
    """The average bits per weight of the quantized Linears with the ``bf16`` layers at 16 bits."""
    params = {f.name: f.metrics.get("weight_params", 0.0) for f in findings}
    total = sum(params.values())
    if not total:
        return None
    kept = sum(params[name] for name in bf16)
    return (kept * BF16_BITS + (total - kept) * get_format(fmt).bits_per_element) / total


def _greedy(
    findings: Sequence[LayerFinding], ranked: Sequence[LayerFinding], fmt: str, count: int, budget_bits: float | None
) -> list[str]:
    """The first ``count`` of ``ranked``, or with ``budget_bits`` as many (in rank order) as keep
    the average bits per weight within it."""
    if budget_bits is None:
        return [f.name for f in ranked[:count]]
    chosen: list[str] = []
    for f in ranked:
        fits = bits_per_weight(findings, fmt, [*chosen, f.name])
        if fits is not None and fits <= budget_bits:
            chosen.append(f.name)
    return chosen


def _predicted(findings: Sequence[LayerFinding], chosen: Sequence[str], all_delta_loss: float | None) -> float | None:
    """Σ exact Δloss of the ``chosen`` layers / Δloss of all layers quantized (harms do not add
    exactly: the verification measures it)."""
    if not all_delta_loss or all_delta_loss <= 0:
        return None
    by_name = {f.name: f for f in findings}
    return sum(by_name[c].metrics["attribution_delta_loss"] for c in chosen) / all_delta_loss


def _spread_harm(
    findings: Sequence[LayerFinding],
    harmful: Sequence[LayerFinding],
    fmt: str,
    budget_bits: float | None,
    all_delta_loss: float | None,
) -> Recommendation:
    """No layer stands out, yet some cost loss by direct evidence: the format's cost is spread.
    The cheapest mitigation is still the top 10 % of layers (or the budget) by exact Δloss in
    BF16; whether that beats keeping *random* layers in BF16 is the verification's question."""
    n = len(findings)
    chosen = _greedy(findings, harmful, fmt, max(1, math.ceil(0.1 * n)), budget_bits)
    milder = milder_format(fmt)
    reason = f"0/{n} layers problematic, but {len(harmful)} cost loss by exact Δloss (spread, none stands out): "
    reason += f"BF16 for the {len(chosen)} most harmful" if chosen else "no harmful layer fits the budget"
    if budget_bits is not None:
        reason += f" within {budget_bits:g} bits per weight"
    reason += f", if the gap matters ({milder or 'BF16'} everywhere is the other option)"
    return Recommendation(
        "spread_harm",
        0.0,
        chosen,
        [],
        None,
        reason,
        predicted_recovery=_predicted(findings, chosen, all_delta_loss),
        bits_per_weight=bits_per_weight(findings, fmt, chosen),
        budget_bits=budget_bits,
    )


def recommend(
    findings: Sequence[LayerFinding],
    fmt: str,
    *,
    budget_bits: float | None = None,
    all_delta_loss: float | None = None,
) -> Recommendation:
    """The decision framework (module docstring) on the problematic share; BF16 layers greedily
    from :func:`_ranked` (the framework's count, or with ``budget_bits`` as many as keep the
    average bits per weight within it); ``all_delta_loss`` (every layer quantized) turns the
    chosen layers' exact Δloss into a predicted recovery."""
    bad = [f for f in findings if f.problematic]
    share = len(bad) / len(findings) if findings else 0.0
    attributed = any(f.label is not None for f in findings)
    n = len(findings)
    if not bad:
        spread = _ranked(findings, True) if attributed else []
        if not spread:
            return Recommendation("no_action", 0.0, [], [], None, f"no layer is worse than expected under {fmt}")
        return _spread_harm(findings, spread, fmt, budget_bits, all_delta_loss)
    if share > 0.30:
        alternative = milder_format(fmt)
        return Recommendation(
            "reconsider_format",
            share,
            [],
            [f.name for f in findings],
            alternative,
            f"{len(bad)}/{n} layers problematic (> 30 %): try {alternative or 'BF16'}; AQN, if used, should be global",
        )
    ranked = _ranked(findings, attributed)
    action = "mixed_precision" if share < 0.10 else "mixed_precision_and_aqn"
    count = len(bad) if action == "mixed_precision" else max(1, math.ceil(0.1 * n))
    chosen = _greedy(findings, ranked, fmt, count, budget_bits)
    if attributed:  # targeted AQN only where the direct evidence says harmful
        aqn = [f.name for f in ranked if f.problematic and f.name not in chosen]
    else:
        aqn = [f.name for f in ranked if f.name not in chosen]
    aqn = aqn if action == "mixed_precision_and_aqn" else []
    predicted = _predicted(findings, chosen, all_delta_loss) if attributed else None
    what = "harmful by exact Δloss" if attributed else "most reasons (no attribution)"
    reason = f"{len(bad)}/{n} layers problematic ({'< 10 %' if action == 'mixed_precision' else '10-30 %'}): "
    reason += (
        f"BF16 for the {len(chosen)} {what}" if chosen else f"no layer is {what.split(' (')[0]}: nothing kept in BF16"
    )
    if budget_bits is not None:
        reason += f" within {budget_bits:g} bits per weight"
    if aqn:
        reason += f", targeted AQN for {len(aqn)} more"
    return Recommendation(
        action,
        share,
        chosen,
        aqn,
        None,
        reason,
        predicted_recovery=predicted,
        bits_per_weight=bits_per_weight(findings, fmt, chosen),
        budget_bits=budget_bits,
    )
