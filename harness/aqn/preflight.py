"""Pre-flight: will this AQN configuration collapse the model?  Measured in seconds on the
quantized model with noise at sigma_start on the chosen targets, against the same quantized
model without noise (design §6).

Verdict thresholds (relative increase of the answer loss, top-1 agreement with the noise-free
quantized model):
- ``collapse``: loss up by more than 50 % or top-1 agreement below 50 % — the model no longer
  predicts what it predicted; the experiment's collapsed runs (1A, 1C on Qwen2.5-1.5B) went from
  ~70 % to 0-2 % accuracy, far past this;
- ``risky``: loss up by more than 10 % or agreement below 80 %;
- ``ok``: otherwise.  The noise of a sound AQN setting is at most a few percent of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from harness.aqn.configs import AQNConfig
from harness.aqn.noise import NoiseInjector
from harness.data import Gsm8kItem
from harness.eval.loss import evaluate_loss, reference_logprobs
from harness.inject import QuantInjector

COLLAPSE_LOSS_INCREASE, COLLAPSE_TOP1 = 0.50, 0.50
RISKY_LOSS_INCREASE, RISKY_TOP1 = 0.10, 0.80


@dataclass(frozen=True)
class PreflightResult:
    config: str
    sigma: float
    layer_types: tuple[str, ...]
    targets: int
    items: int
    loss_quantized: float
    loss_noisy: float
    loss_increase: float
    entropy_quantized: float
    entropy_noisy: float
    top1_agree: float
    kl: float
    verdict: str

    def as_dict(self) -> dict:
        return asdict(self)


def verdict(loss_increase: float, top1_agree: float) -> str:
    if loss_increase > COLLAPSE_LOSS_INCREASE or top1_agree < COLLAPSE_TOP1:
        return "collapse"
    if loss_increase > RISKY_LOSS_INCREASE or top1_agree < RISKY_TOP1:
        return "risky"
    return "ok"


def preflight(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    config: AQNConfig,
    *,
    fmt: str = "mxfp4",
    point: str = "weight",
    include: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    clean: list | None = None,
) -> PreflightResult:
    """``clean``: the noise-free quantized model's ``reference_logprobs`` on ``items`` when the
    caller already has them (several configurations, one quantized model): one pass saved."""
    config.schedule(total_steps=config.num_stages)  # invalid configurations raise before any noise
    with QuantInjector(model, fmt, point, seed=seed) as injector:
        if clean is None:
            clean = reference_logprobs(model, tokenizer, items, batch_size=batch_size)
        with NoiseInjector(model, config.layer_types, include=include, scale=config.scale, seed=seed) as noise:
            with noise.noisy(config.sigma_start):
                s = evaluate_loss(model, tokenizer, items, injector, reference=clean, batch_size=batch_size).summary()
    increase = s["loss"] / s["reference_loss"] - 1
    return PreflightResult(
        config=config.name,
        sigma=config.sigma_start,
        layer_types=config.layer_types,
        targets=noise.touched,
        items=s["n"],
        loss_quantized=s["reference_loss"],
        loss_noisy=s["loss"],
        loss_increase=increase,
        entropy_quantized=s["reference_entropy"],
        entropy_noisy=s["entropy"],
        top1_agree=s["top1_agree"],
        kl=s["kl"],
        verdict=verdict(increase, s["top1_agree"]),
    )
