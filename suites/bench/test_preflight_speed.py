"""Speed of the AQN pre-flight (``harness aqn preflight``'s default: 8 noise draws on 32 items),
measured as a ratio to one full quantized loss pass over the same 32 items in the same process,
so numbers from different machines (and loads) compare.  Marker ``bench``: not in the default CI
run; ``make bench`` runs it.  The wall time of the command itself is in docs/measurements/."""

from __future__ import annotations

import time

import pytest

from harness.aqn.configs import get_config
from harness.aqn.preflight import DRAWS, ITEMS, preflight
from harness.eval.loss import evaluate_loss
from harness.inject import QuantInjector

pytestmark = [pytest.mark.bench, pytest.mark.aqn, pytest.mark.mxfp4]


def test_preflight_costs_at_most_one_pass_per_draw(benchmark, model_under_test, loss_items, metrics) -> None:
    """The pre-flight runs one noise-free quantized pass and one noisy pass per draw, each on the
    items cut to their first answer line (shorter than the whole answers of a full loss pass), so
    it costs at most ``DRAWS + 1`` full quantized passes (9 for the defaults); the noise itself is
    an in-place add on the targeted weights.  A full pass: ``evaluate_loss`` under MXFP4 runs the
    reference and the quantized model on the whole answers (two passes, halved)."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    items = loss_items[:ITEMS]
    t0 = time.perf_counter()
    with QuantInjector(model, "mxfp4") as injector:
        evaluate_loss(model, tok, items, injector)
    one_pass = (time.perf_counter() - t0) / 2
    t0 = time.perf_counter()
    result = benchmark.pedantic(preflight, args=(model, tok, items, get_config("1C")), rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    ratio = seconds / one_pass
    benchmark.extra_info.update(full_pass_s=one_pass, preflight_s=seconds, full_passes=ratio, draws=DRAWS)
    metrics.record(full_pass_s=one_pass, preflight_s=seconds, full_passes=ratio)
    assert len(result.draws) == DRAWS and result.items == ITEMS
    assert ratio <= DRAWS + 1, f"the pre-flight cost {ratio:.1f} full loss passes, more than {DRAWS + 1}"
