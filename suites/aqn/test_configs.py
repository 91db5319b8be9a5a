"""AQN configurations from QeRL and the experiment's notes (§14, §19-§22) on the model under
test: schedules, validation, targets, and the pre-flight verdicts.

Which absolute sigma is safe depends on the model's weights.  On SmolLM2 (RMSNorm weights mean
0.29; MXFP4 W4A16 answer loss 1.80 on 16 items) QeRL's default sigma 0.05 on the norms raises the
loss to ~4.9 and 1A (0.05 on Linear) to ~7: both collapse, while QeRL's NVFP4-script sigma 0.01 on
the norms (~1.88) and 1D (0.001 on Linear, ~1.80) are ok.  The verdict thresholds are documented
in harness/aqn/preflight.py.
"""

from __future__ import annotations

import pytest
import torch

from harness.aqn.configs import CONFIGS
from harness.aqn.noise import NoiseInjector
from harness.aqn.preflight import preflight
from harness.aqn.schedule import ScheduleError
from harness.eval.loss import reference_logprobs
from harness.inject import QuantInjector

pytestmark = [pytest.mark.aqn, pytest.mark.mxfp4]
PREFLIGHT_ITEMS = 16
EXPECTED = {
    "qerl-default": "collapse",
    "qerl-nvfp4": "ok",
    "1A": "collapse",
    "1D": "ok",
    "1B": "collapse",
    "1C": "ok",
    "1E": "collapse",
}
IN_CI = ("qerl-default", "qerl-nvfp4", "1A", "1D")


def config_params(names) -> list:
    return [pytest.param(CONFIGS[n], id=n, marks=[] if n in IN_CI else [pytest.mark.slow]) for n in names]


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
def test_targets_on_the_model_under_test(lm, config) -> None:
    """SmolLM2: 61 RMSNorms (2 per layer + the final norm), 210 decoder Linears (lm_head and the
    embedding are excluded by default); parameters bit-identical after the context."""
    model, _ = lm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NoiseInjector(model, config.layer_types) as noise:
        with noise.noisy(config.sigma_start):
            pass
        touched = noise.touched
    if model.config.num_hidden_layers == 30:
        assert touched == {"rmsnorm": 61, "linear": 210}[config.layer_types[0]]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def quantized_clean(lm, loss_items):
    """The noise-free MXFP4 (W4A16) model's log-probs on the pre-flight items, shared by every
    configuration's pre-flight (what preflight() computes itself when not given them)."""
    model, tok = lm
    with QuantInjector(model, "mxfp4", "weight", seed=0):
        return reference_logprobs(model, tok, loss_items[:PREFLIGHT_ITEMS])


@pytest.mark.parametrize("config", config_params(EXPECTED))
def test_preflight_verdict(lm, loss_items, quantized_clean, config, metrics) -> None:
    model, tok = lm
    result = preflight(model, tok, loss_items[:PREFLIGHT_ITEMS], config, clean=quantized_clean)
    metrics.record(loss_quantized=result.loss_quantized, loss_noisy=result.loss_noisy, top1_agree=result.top1_agree)
    if model.config.num_hidden_layers == 30:  # the verdicts measured for SmolLM2
        assert result.verdict == EXPECTED[config.name], result
    assert result.loss_noisy >= result.loss_quantized * 0.98


def test_broken_configuration_fails_preflight_before_any_noise(lm, loss_items) -> None:
    model, tok = lm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ScheduleError, match="sigma_end must be > 0"):
        preflight(model, tok, loss_items[:2], CONFIGS["broken-sigma-end-0"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
