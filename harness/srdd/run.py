"""One SRDD scan end to end: scans -> attribution -> findings -> recommendation -> verification
against a control, as the typed document (``harness.srdd.document``) the CLI writes and the report
renders."""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch import nn

import harness
from harness.formats import get_format
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd import scan
from harness.srdd.criteria import Rules, Thresholds, layer_findings, recommend
from harness.srdd.document import (
    AttributionEntry,
    LayerReport,
    ModuleReport,
    RecommendationReport,
    ScanDocument,
    ScreenEntry,
)
from harness.srdd.sensitivity import DEFAULT_MODE, screened_attribution
from harness.srdd.verify import verify

POINTS_SCANNED = {"weight": ("weight",), "input": ("input",), "both": ("weight", "input")}


def _modules(result: scan.ScanResult, layers: list[str]) -> list[ModuleReport]:
    reports = []
    for name, kinds in result.modules.items():
        metrics = {kind: stats.as_dict() for kind, stats in kinds.items()}
        for kind, floor in result.floors.get(name, {}).items():
            metrics[f"{kind}_floor"] = floor.as_dict()
        if name in result.output_error:
            metrics["output"] = {"output_error": result.output_error[name].output_error}
        shape = list(result.module_shapes.get(name, ()))
        reports.append(ModuleReport(name, scan.layer_of(name, layers), shape, result.module_formats.get(name), metrics))
    return reports


# Runs of the instability scan: a stochastic format's spread is what it measures; a deterministic
# format must show none, which the minimum of 2 runs shows.
STOCHASTIC_RUNS, DETERMINISTIC_RUNS = 5, 2


def default_instability_runs(fmt: str) -> int:
    """:data:`STOCHASTIC_RUNS` for a stochastic format, else :data:`DETERMINISTIC_RUNS`."""
    return STOCHASTIC_RUNS if get_format(fmt).stochastic else DETERMINISTIC_RUNS


def scan_model(
    model: nn.Module,
    tokenizer,
    calibration: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    *,
    model_name: str,
    thresholds: Thresholds | None = None,
    rules: Rules | None = None,
    evaluation: Sequence[Gsm8kItem] = (),
    attribution: bool = False,
    attribution_mode: str = DEFAULT_MODE,
    gain: bool = True,
    instability_runs: int | None = None,
    instability_prompts: int = 4,
    batch_size: int = 8,
    do_verify: bool = True,
    progress: bool = False,
    allow_partial: bool = False,
) -> ScanDocument:
    """Scan ``model`` under ``fmt`` at ``point`` on ``calibration`` texts; ``evaluation`` items feed
    the loss attribution (``attribution_mode``: ``harness.srdd.sensitivity.ATTRIBUTION_MODES``;
    the two-stage ``screen`` runs exactly the layers the detectors flagged) and the verification.
    ``instability_runs``: runs of the instability scan (0: skip it; None: :func:`default_instability_runs`).
    ``allow_partial``: accept weights the injector cannot quantize (the document's ``coverage`` says which)."""
    thresholds, rules = thresholds or Thresholds(), rules or Rules()
    if instability_runs is None:
        instability_runs = default_instability_runs(fmt)
    injector = QuantInjector(model, fmt, point, allow_partial=allow_partial)
    injector.select()  # refuses a partial scan before any work unless allow_partial
    started = time.perf_counter()
    result = scan.ScanResult()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timings[name] = time.perf_counter() - t0
        return out

    if "weight" in POINTS_SCANNED[point]:
        timed("weight_scan", scan.weight_scan, model, fmt, result, allow_partial=allow_partial)
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
        allow_partial=allow_partial,
    )
    probe = calibration[:instability_prompts]
    if gain:
        timed("gain_scan", scan.gain_scan, model, tokenizer, probe, fmt, point, result, allow_partial=allow_partial)
    if instability_runs:
        timed(
            "instability_scan",
            scan.instability_scan,
            model,
            tokenizer,
            probe,
            fmt,
            point,
            result,
            runs=instability_runs,
            allow_partial=allow_partial,
        )
    layers = ModelView(model).layer_names
    rows, screen = [], []
    if attribution and evaluation:
        flagged = [f.name for f in layer_findings(result, layers, thresholds, rules) if f.problematic]
        rows, screen = timed(
            "loss_attribution",
            screened_attribution,
            model,
            tokenizer,
            evaluation,
            fmt,
            point,
            mode=attribution_mode,
            flagged=flagged,
            batch_size=batch_size,
            progress=progress,
            allow_partial=allow_partial,
        )
    findings = layer_findings(result, layers, thresholds, rules, rows, screen)
    rec = recommend(findings, fmt)
    verification = None
    if do_verify and evaluation:
        verification = timed(
            "verify",
            verify,
            model,
            tokenizer,
            evaluation,
            fmt,
            point,
            rec,
            layers,
            batch_size=batch_size,
            allow_partial=allow_partial,
        )
    timings["total"] = time.perf_counter() - started
    return ScanDocument(
        model=model_name,
        format=fmt,
        point=point,
        harness_version=harness.__version__,
        prompts=result.prompts,
        tokens=result.tokens,
        evaluation_items=len(evaluation),
        rules=rules.as_dict(),
        thresholds=thresholds.as_dict(),
        modules=_modules(result, layers),
        layers=[LayerReport.of(f) for f in findings],
        attribution=[AttributionEntry.of(r) for r in rows],
        recommendation=RecommendationReport.of(rec, verification),
        timings_s=timings,
        screen=[ScreenEntry.of(r, {row.layer for row in rows}) for r in screen],
        coverage=injector.coverage.to_json(),
    )
