"""AQN configurations (QeRL's and the 1A-1E variants, ``harness.aqn.configs``) on the model under
test: schedules, validation, targets, and the pre-flight verdicts.

Which absolute sigma is safe depends on the model's weights.  The verdicts follow the CI over
noise draws (harness/aqn/preflight.py); here every configuration runs on the first 16 of the
command's 32 items (first answer lines) with 4 draws, the first 4 of `aqn preflight`'s 8, so the
CIs are wider than the command's.  Measured on SmolLM2 with the command (noise-free MXFP4 loss
2.502 on its 32 items): QeRL's default sigma 0.05 on the norms (= 1E) raises the loss by +67 % to
+306 % depending on the draw: with 4 draws the CI straddles the collapse line (borderline; with 8
draws `aqn preflight` says collapse); 1A (0.05 on Linear) collapses on every draw (top-1
agreement 0.05), 1B (0.15 on Linear) more so (+466 % to +642 % over 8 draws, top-1 agreement
0.002); 1C (0.005 on Linear) costs +0.7 % to +9.5 % of loss but its top-1 agreement CI lies below
0.80: risky, not ok; 1D (0.001 on Linear) is ok (+0.9 %, agreement 0.867).
"""

from __future__ import annotations

import pytest
import torch

from harness.aqn.configs import CONFIGS
from harness.aqn.noise import NoiseInjector
from harness.aqn.preflight import preflight, preflight_items
from harness.aqn.schedule import ScheduleError
from harness.eval.loss import answer_logprobs
from harness.inject import QuantInjector

pytestmark = [pytest.mark.aqn, pytest.mark.mxfp4]
PREFLIGHT_ITEMS, PREFLIGHT_DRAWS = 16, 4  # CI-sized; `aqn preflight` defaults to 32 items x 8 draws
# The 4-draw verdicts measured for SmolLM2 (harness 12: BOS policy, first answer lines, 16 items).
EXPECTED = {
    "qerl-default": "borderline",
    "qerl-nvfp4": "ok",
    "1A": "collapse",
    "1B": "collapse",
    "1C": "risky",
    "1D": "ok",
    "1E": "borderline",
}


@pytest.mark.parametrize("config", [pytest.param(c, id=c.name) for c in CONFIGS.values()])
def test_schedule_or_the_reason_it_is_invalid(config) -> None:
    if config.sigma_end <= 0:
        with pytest.raises(ScheduleError, match="broken AQN"):
            config.schedule(58)
        return
    values = config.schedule(58).values()
    noisy = [v for v in values if v > 0]
    assert values[0] == 0.0 and noisy[0] == config.sigma_start and noisy == sorted(noisy, reverse=True)
    assert values[-1] == pytest.approx(config.sigma_end) and len(set(noisy)) == config.num_stages - 1


@pytest.mark.parametrize("config", [pytest.param(c, id=c.name) for c in CONFIGS.values() if c.sigma_end > 0])
def test_targets_on_the_model_under_test(model_under_test, config) -> None:
    """SmolLM2: 61 RMSNorms (2 per layer + the final norm), 210 decoder Linears (lm_head and the
    embedding are excluded by default); parameters bit-identical after the context."""
    model = model_under_test.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NoiseInjector(model, config.layer_types) as noise:
        with noise.noisy(config.sigma_start):
            pass
        touched = noise.touched
    if model.config.num_hidden_layers == 30:
        assert touched == {"rmsnorm": 61, "linear": 210}[config.layer_types[0]]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def quantized_clean(model_under_test, loss_items):
    """The noise-free MXFP4 (W4A16) model's log-probs on the pre-flight items, shared by every
    configuration's pre-flight (what preflight() computes itself when not given them)."""
    model, tok = model_under_test.model, model_under_test.tokenizer
    with QuantInjector(model, "mxfp4", "weight", seed=0):
        return answer_logprobs(model, tok, preflight_items(loss_items[:PREFLIGHT_ITEMS]))


@pytest.mark.parametrize("config", [pytest.param(c, id=c.name) for c in CONFIGS.values() if c.sigma_end > 0])
def test_preflight_verdict(model_under_test, loss_items, quantized_clean, config, metrics) -> None:
    model, tok = model_under_test.model, model_under_test.tokenizer
    result = preflight(model, tok, loss_items[:PREFLIGHT_ITEMS], config, draws=PREFLIGHT_DRAWS, clean=quantized_clean)
    li, t1 = result.loss_increase, result.top1_agree
    metrics.record(
        loss_quantized=result.loss_quantized, loss_increase=li.mean, loss_increase_ci_low=li.low, top1_agree=t1.mean
    )
    assert len(result.draws) == PREFLIGHT_DRAWS and li.low <= li.mean <= li.high and t1.low <= t1.mean <= t1.high
    if model.config.num_hidden_layers == 30 and config.name in EXPECTED:  # the verdicts measured for SmolLM2
        assert result.verdict == EXPECTED[config.name], result
    assert min(d["loss_noisy"] for d in result.draws) >= result.loss_quantized * 0.98


def test_broken_configuration_fails_preflight_before_any_noise(model_under_test, loss_items) -> None:
    model, tok = model_under_test.model, model_under_test.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ScheduleError, match="sigma_end must be > 0"):
        preflight(model, tok, loss_items[:2], CONFIGS["broken-sigma-end-0"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
