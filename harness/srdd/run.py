"""One SRDD scan end to end: scans -> findings of the local detectors -> attribution (the Fisher
screen plus exact rows for every layer it or a detector points at, by default) -> findings ->
recommendation -> verification on held-out items against random draws, as the typed document
(``harness.srdd.document``) the CLI writes and the report renders."""

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
from harness.srdd.attribution import selected_layers
from harness.srdd.criteria import Rules, Thresholds, layer_findings, pointed_at, recommend
from harness.srdd.document import (
    AttributionEntry,
    LayerReport,
    ModuleReport,
    RecommendationReport,
    ScanDocument,
    ScreenEntry,
)
from harness.srdd.sensitivity import DEFAULT_MODE, check_mode, screened_attribution
from harness.srdd.verify import CONTROL_DRAWS, verify

POINTS_SCANNED = {"weight": ("weight",), "input": ("input",), "both": ("weight", "input")}


def _modules(result: scan.ScanResult, layers: list[str]) -> list[ModuleReport]:
    reports = []
    for name, kinds in result.modules.items():
        metrics = {kind: stats.as_dict() for kind, stats in kinds.items()}
        for kind, floor in result.floors.get(name, {}).items():
            metrics[f"{kind}_floor"] = floor.as_dict()
        if name in result.output_error:
            metrics["output"] = {"output_error": result.output_error[name].output_error}
        if name in result.weight_peak and "weight" in metrics:
            metrics["weight"]["peak_to_rms"] = result.weight_peak[name]
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
    heldout: Sequence[Gsm8kItem] = (),
    heldout_items: Sequence[int] | None = None,
    attribution: str = DEFAULT_MODE,
    gain: bool = True,
    instability_runs: int | None = None,
    instability_prompts: int = 4,
    batch_size: int = 8,
    control_draws: int = CONTROL_DRAWS,
    control_items: int | None = None,
    budget_bits: float | None = None,
    exclude: Sequence[str] = (),
    do_verify: bool = True,
    progress: bool = False,
    allow_partial: bool = False,
) -> ScanDocument:
    """Scan ``model`` under ``fmt`` at ``point`` on ``calibration`` texts.  ``evaluation`` items
    feed the loss attribution (``attribution``: ``harness.srdd.sensitivity.ATTRIBUTION_MODES``) and
    so choose the recommendation; the disjoint ``heldout`` items (``heldout_items``: their indices in
    the test split, default the positions after ``evaluation``) verify it against
    ``control_draws`` random draws (measured on the first ``control_items``).  ``exclude``: module
    globs kept in their original precision everywhere (e.g. a layer kept in BF16).
    ``instability_runs``: runs of the instability scan (0: skip it; None: :func:`default_instability_runs`).
    ``allow_partial``: accept weights the injector cannot quantize (the document's ``coverage`` says which)."""
    thresholds, rules = thresholds or Thresholds(), rules or Rules()
    check_mode(attribution)
    if instability_runs is None:
        instability_runs = default_instability_runs(fmt)
    started = time.perf_counter()
    result = scan.ScanResult()
    timings: dict[str, float] = {}
    select = {"exclude": tuple(exclude), "allow_partial": allow_partial}
    injector = QuantInjector(model, fmt, point, **select)
    injector.select()  # refuses a partial scan before any work unless allow_partial

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timings[name] = time.perf_counter() - t0
        return out

    if "weight" in POINTS_SCANNED[point]:
        timed("weight_scan", scan.weight_scan, model, fmt, result, **select)
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
        **select,
    )
    probe = calibration[:instability_prompts]
    if gain:
        timed("gain_scan", scan.gain_scan, model, tokenizer, probe, fmt, point, result, **select)
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
            **select,
        )
    layers = ModelView(model).layer_names
    rows, screen = [], []
    if attribution != "none" and evaluation:
        flagged = pointed_at(layer_findings(result, layers, thresholds, rules))
        rows, screen = timed(
            "loss_attribution",
            screened_attribution,
            model,
            tokenizer,
            evaluation,
            fmt,
            point,
            mode=attribution,
            flagged=flagged,
            batch_size=batch_size,
            progress=progress,
            **select,
        )
    findings = layer_findings(result, layers, thresholds, rules, rows, screen)
    everything = next((r.delta_loss for r in rows if r.layer == "all"), None)
    rec = recommend(findings, fmt, budget_bits=budget_bits, all_delta_loss=everything)
    verification = None
    if do_verify and heldout:
        if heldout_items is None:
            heldout_items = range(len(evaluation), len(evaluation) + len(heldout))
        quantized = selected_layers(model, QuantInjector(model, fmt, point, **select))
        verification = timed(
            "verify",
            verify,
            model,
            tokenizer,
            heldout,
            fmt,
            point,
            rec,
            quantized,
            heldout_items=heldout_items,
            draws=control_draws,
            control_items=control_items,
            batch_size=batch_size,
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
        attribution=[AttributionEntry.of(r, rules.negligible_delta) for r in rows],
        recommendation=RecommendationReport.of(rec, verification),
        timings_s=timings,
        screen=[ScreenEntry.of(r, {row.layer for row in rows}) for r in screen],
        coverage=injector.coverage.to_json(),
    )
