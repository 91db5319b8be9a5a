"""One SRDD scan end to end: scans -> findings -> recommendation -> verification, as the JSON
document the CLI writes and the report renders."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from torch import nn

import harness
from harness.data import Gsm8kItem
from harness.eval.loss import evaluate_loss, reference_logprobs
from harness.inject import QuantInjector
from harness.srdd import scan
from harness.srdd.criteria import Recommendation, Thresholds, layer_findings, recommend

POINTS_SCANNED = {"weight": ("weight",), "input": ("input",), "both": ("weight", "input")}


def verify(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    rec: Recommendation,
    *,
    batch_size: int = 8,
) -> dict | None:
    """Re-run the loss with the proposal (BF16 overrides, or the milder format) and report how
    much of the format's loss increase it recovers: (loss_fmt − loss_proposed) / (loss_fmt − loss_ref)."""
    if rec.action == "no_action" or (rec.action == "reconsider_format" and rec.alternative_format is None):
        return None
    reference = reference_logprobs(model, tokenizer, items, batch_size=batch_size)

    def loss(f: str, **kw) -> dict[str, float]:
        with QuantInjector(model, f, point, seed=0, **kw) as inj:
            return evaluate_loss(model, tokenizer, items, inj, reference=reference, batch_size=batch_size).summary()

    as_is = loss(fmt)
    if rec.action == "reconsider_format":
        proposal, proposed = f"{rec.alternative_format} everywhere", loss(rec.alternative_format)
    else:
        overrides = {f"{layer}.*": None for layer in rec.bf16_layers}
        proposal, proposed = f"{fmt} with {len(rec.bf16_layers)} layers in BF16", loss(fmt, overrides=overrides)
    gap = as_is["loss"] - as_is["reference_loss"]
    return {
        "proposal": proposal,
        "items": as_is["n"],
        "reference_loss": as_is["reference_loss"],
        "format_loss": as_is["loss"],
        "proposed_loss": proposed["loss"],
        "format_kl": as_is["kl"],
        "proposed_kl": proposed["kl"],
        "recovery": (as_is["loss"] - proposed["loss"]) / gap if gap > 0 else math.nan,
    }


def scan_model(
    model: nn.Module,
    tokenizer,
    calibration: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    *,
    model_name: str,
    thresholds: Thresholds | None = None,
    evaluation: Sequence[Gsm8kItem] = (),
    attribution: bool = False,
    gain: bool = True,
    instability_runs: int = 5,
    instability_prompts: int = 4,
    batch_size: int = 8,
    do_verify: bool = True,
    progress: bool = False,
) -> dict:
    """Scan ``model`` under ``fmt`` at ``point`` on ``calibration`` texts; ``evaluation`` items feed
    the loss attribution and the verification."""
    thresholds = thresholds or Thresholds()
    started = time.perf_counter()
    result = scan.ScanResult()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        fn(*args, **kw)
        timings[name] = time.perf_counter() - t0

    if "weight" in POINTS_SCANNED[point]:
        timed("weight_scan", scan.weight_scan, model, fmt, result)
    timed(
        "activation_scan",
        scan.activation_scan,
        model,
        tokenizer,
        calibration,
        fmt,
        point,
        result,
        batch_size=batch_size,
        progress=progress,
    )
    if gain:
        timed("gain_scan", scan.gain_scan, model, tokenizer, calibration[:instability_prompts], fmt, point, result)
    if instability_runs:
        timed(
            "instability_scan",
            scan.instability_scan,
            model,
            tokenizer,
            calibration[:instability_prompts],
            fmt,
            point,
            result,
            runs=instability_runs,
        )
    if attribution and evaluation:
        timed(
            "loss_attribution",
            scan.loss_attribution,
            model,
            tokenizer,
            evaluation,
            fmt,
            point,
            result,
            batch_size=batch_size,
            progress=progress,
        )
    layers = [name for name, _ in scan.decoder_layers(model)]
    findings = layer_findings(result, layers, thresholds)
    rec = recommend(findings, fmt)
    verification = None
    if do_verify and evaluation:
        t0 = time.perf_counter()
        verification = verify(model, tokenizer, evaluation, fmt, point, rec, batch_size=batch_size)
        timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    modules = [
        {
            "name": name,
            "layer": scan.layer_of(name, layers),
            "shape": list(result.module_shapes.get(name, ())),
            **{kind: stats.as_dict() for kind, stats in kinds.items()},
        }
        for name, kinds in result.modules.items()
    ]
    return {
        "harness_version": harness.__version__,
        "model": model_name,
        "format": fmt,
        "point": point,
        "prompts": result.prompts,
        "tokens": result.tokens,
        "evaluation_items": len(evaluation),
        "thresholds": thresholds.as_dict(),
        "modules": modules,
        "layers": [f.as_dict() for f in findings],
        "attribution": result.attribution,
        "summary": {
            "layers": len(findings),
            "problematic_layers": [f.name for f in findings if f.problematic],
            "recommendation": rec.as_dict(),
            "verification": verification,
        },
        "timings_s": timings,
    }
