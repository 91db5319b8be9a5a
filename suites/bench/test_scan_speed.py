"""End-to-end speed of the default model's SRDD scan and loss evaluation (pytest-benchmark,
marker ``bench``), and the scan's memory staying flat in the number of prompts."""

from __future__ import annotations

import resource
import statistics
import time

import pytest

from harness.eval.loss import evaluate_loss
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd import scan
from harness.srdd.attribution import loss_attribution, ranked
from harness.srdd.sensitivity import TOP_K, fisher_screen

pytestmark = pytest.mark.bench
# The Fisher screen's bound in full loss passes: about 5, plus the unit pass's own spread between
# runs (its CPU time moves by up to 30 % while the screen's stays within 5 %).
SCREEN_PASSES = 6.5


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def full_scan(model, tok, items) -> scan.ScanResult:
    """The CLI's weight + activation scan (``--point both``)."""
    result = scan.ScanResult()
    scan.weight_scan(model, "mxfp4", result)
    scan.activation_scan(model, tok, items, "mxfp4", "both", result)
    return result


def widest_batch(tok, items, batch_size: int = 8) -> list:
    """The batch of the scan's own batching (consecutive ``batch_size`` items) with the most
    padded positions: it sets the scan's peak, whatever the number of prompts."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return max(batches, key=lambda b: len(b) * max(len(tok(item.text)["input_ids"]) for item in b))


@pytest.mark.mxfp4
@pytest.mark.slow  # ~2 min of scanning here; run with make bench / -m bench
def test_weight_and_activation_scan_32_prompts(benchmark, model_under_test, calibration_items, metrics) -> None:
    """Memory: a scan of the widest batch of 8 prompts first sets the peak (model + that batch's
    activations); the scan of all 32 prompts, 4 batches no wider than it, must not raise the peak
    by more than 5 % because only per-layer sums are kept across batches."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    full_scan(model, tok, widest_batch(tok, calibration_items))
    peak_8 = peak_rss_mib()
    result = benchmark.pedantic(full_scan, args=(model, tok, calibration_items), rounds=1, iterations=1)
    peak_32 = peak_rss_mib()
    benchmark.extra_info.update(
        prompts=result.prompts, tokens=result.tokens, peak_rss_mib_8=peak_8, peak_rss_mib_32=peak_32
    )
    metrics.record(peak_rss_mib_8_prompts=peak_8, peak_rss_mib_32_prompts=peak_32)
    assert result.prompts == 32
    assert peak_32 <= peak_8 * 1.05, f"peak RSS grew from {peak_8:.0f} MiB (8 prompts) to {peak_32:.0f} MiB (32)"


@pytest.mark.mxfp4
def test_loss_evaluation_32_items(benchmark, model_under_test, loss_items) -> None:
    model, tok = model_under_test.model, model_under_test.tokenizer

    def run():
        with QuantInjector(model, "mxfp4") as injector:
            return evaluate_loss(model, tok, loss_items, injector)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(items=result.n, tokens=sum(result.n_tokens))
    assert result.n == 32


def timed(fn, *args, **kw):
    """``(fn(*args, **kw), CPU seconds of this process it took)``: the attribution benches compare
    costs as ratios of CPU time, which other processes on a shared machine barely move (wall
    time ratios moved by ±30 % on the 2-core machine shared by four)."""
    t0 = time.process_time()
    return fn(*args, **kw), time.process_time() - t0


def one_quantized_pass_s(model, tok, items, repeats: int = 3) -> float:
    """CPU seconds of one full loss pass under MXFP4 weights (the unit of the attribution benches):
    ``evaluate_loss`` runs the reference and the quantized pass, half of its time each; after one
    untimed warm-up call, the median of ``repeats`` timed calls (one timing of a cold model moved
    the unit by 20 %)."""
    with QuantInjector(model, "mxfp4") as injector:
        evaluate_loss(model, tok, items, injector)
        return statistics.median(timed(evaluate_loss, model, tok, items, injector)[1] / 2 for _ in range(repeats))


@pytest.mark.mxfp4
@pytest.mark.slow  # ~16 loss passes of 8 items here; run with make bench / -m bench
def test_one_layer_attribution_costs_about_half_a_pass_per_layer(model_under_test, loss_items, metrics) -> None:
    """One-layer attribution over all N layers re-runs layers i..N-1 from the reference's recorded
    input of layer i and the LM head at answer positions only: N(N+1)/2 layer passes plus N head
    passes, about N/2 + 1 full loss passes (16.5 for SmolLM2's 30 layers; the old per-layer
    attribution cost 2N + 1 = 61).  Measured against one full quantized loss pass, same items."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    items = loss_items[:8]
    one_pass = one_quantized_pass_s(model, tok, items)
    rows, attribution = timed(loss_attribution, model, tok, items, "mxfp4", "weight")
    layers = model.config.num_hidden_layers
    ratio = attribution / one_pass
    metrics.record(full_pass_s=one_pass, attribution_s=attribution, full_passes=ratio, layers=layers)
    assert len(rows) == layers + 1
    assert ratio < 0.75 * layers, f"attribution cost {ratio:.1f} full passes for {layers} layers"


@pytest.mark.mxfp4
@pytest.mark.slow  # ~16 loss passes of 8 items here; run with make bench / -m bench
def test_screened_attribution_of_all_layers_costs_about_5_passes(model_under_test, loss_items, metrics) -> None:
    """The Fisher screen of all N layers (``harness.srdd.sensitivity``): one reference forward
    with gradients on the hidden states, one quantized pass of each layer on its recorded input
    (one stack pass in all) and 1 + SAMPLES backward passes (answer tokens, 2 Fisher sketch
    draws), answer positions only through the LM head: about 5 full loss passes whatever N, asserted
    <= ``SCREEN_PASSES`` (the exact attribution of all 30 layers costs N/2 + 1 = 16.5).  The
    two-stage attribution adds the exact rows of the top 5 (the all-layers row, ~2 passes, and at
    most 5 suffixes): recorded, bounded by ``SCREEN_PASSES`` + 3 + 5."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    items = loss_items[:8]
    one_pass = one_quantized_pass_s(model, tok, items)
    screen, screen_s = timed(fisher_screen, model, tok, items, "mxfp4", "weight")
    top = {r.layer for r in ranked(screen)[:TOP_K]}
    exact, exact_s = timed(loss_attribution, model, tok, items, "mxfp4", "weight", only=top)
    layers = model.config.num_hidden_layers
    ratio, total = screen_s / one_pass, (screen_s + exact_s) / one_pass
    metrics.record(full_pass_s=one_pass, screen_s=screen_s, screen_passes=ratio, two_stage_passes=total, layers=layers)
    assert len(screen) == layers and len(exact) == TOP_K + 1
    assert ratio <= SCREEN_PASSES, f"the screen of {layers} layers cost {ratio:.1f} full passes"
    assert total <= SCREEN_PASSES + 3 + TOP_K, f"the two-stage attribution cost {total:.1f} full passes"


@pytest.mark.mxfp4
@pytest.mark.slow  # ~40 loss passes of 8 items here; run with make bench / -m bench
def test_default_scan_attribution_and_verification_cost(
    model_under_test, loss_items, calibration_items, metrics
) -> None:
    """What ``harness scan`` adds by default, in full loss passes of the same items measured in the
    same run: the activation scan with its local pass (each layer quantized alone on its recorded
    reference input: about one more stack pass), the two-stage attribution with exact rows for the
    screen's top 5 and every layer a local detector points at, and the verification against 19
    draws (the reference's log-probs once, then one quantized pass each for the format as is, the
    proposal and every draw: 1 + 2 + 19 = 22, asserted within 10 % of it)."""
    from harness.srdd.criteria import Recommendation, layer_findings, pointed_at
    from harness.srdd.sensitivity import screened_attribution
    from harness.srdd.verify import CONTROL_DRAWS, verify

    model, tok = model_under_test.model, model_under_test.tokenizer
    items, layers = loss_items[:8], ModelView(model).layer_names
    one_pass = one_quantized_pass_s(model, tok, items)
    result = scan.ScanResult()
    scan.weight_scan(model, "mxfp4", result)
    _, activation_s = timed(scan.activation_scan, model, tok, items, "mxfp4", "weight", result)
    flagged = pointed_at(layer_findings(result, layers))
    (rows, screen), attribution_s = timed(
        screened_attribution, model, tok, items, "mxfp4", "weight", mode="screen", flagged=flagged
    )
    top = [r.layer for r in sorted(rows[1:], key=lambda r: -r.delta_loss)[:3]]
    rec = Recommendation("mixed_precision", 0.1, top, [], None, "bench")
    ver, verify_s = timed(verify, model, tok, items, "mxfp4", "weight", rec, layers)
    passes = {
        "activation_scan": activation_s / one_pass,
        "attribution": attribution_s / one_pass,
        "verification": verify_s / one_pass,
    }
    metrics.record(full_pass_s=one_pass, exact_rows=len(rows) - 1, pointed_at=len(flagged), **passes)
    assert len(ver.control_recoveries) == CONTROL_DRAWS
    assert passes["verification"] <= 1.1 * (1 + 2 + CONTROL_DRAWS)
    assert passes["attribution"] <= SCREEN_PASSES + 3 + len(set(flagged) | set(r.layer for r in screen[:5]))
