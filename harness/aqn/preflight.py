"""Pre-flight: will this AQN configuration collapse the model?  Measured on the quantized model
with noise at sigma_start on the chosen targets, against the same quantized model without noise
over ``draws`` seeded noise draws (default 8) on ``items`` GSM8K test items (default
32), never on one draw: on SmolLM2 one configuration (1C) moves from +0.7 % to +9.5 % loss between
draws.  Its cost is at most draws + 1 full loss passes (suites/bench/test_preflight_speed.py;
measured times in docs/measurements/).

Per draw d (noise seed ``seed + d``): the relative increase of the token-weighted answer loss,
``loss_noisy_d / loss_quantized - 1``, and the top-1 agreement with the noise-free quantized model
(plus KL and predictive entropy).  The noise-free quantized pass runs once and is reused by every
draw.  The 95 % CI of each is Student's t over the draws, ``mean ± t_{0.975, D-1} · sd / sqrt(D)``:
the items are fixed, so it is the uncertainty over noise draws on these items.

To stay practical on a CPU, each item's answer is cut to its first ``answer_lines`` lines
(default 1: the first reasoning step, ~30 tokens after a ~64-token question) and the items are
sorted by length before batching (less padding); ``answer_lines=0`` keeps whole answers.

Thresholds (``Thresholds``, relative loss increase / top-1 agreement):
- collapse line: loss up by more than 50 % or agreement below 50 % — the model no longer predicts
  what it predicted (runs that collapsed in training, 1A and 1C on Qwen2.5-1.5B, went from ~70 %
  to 0-2 % GSM8K accuracy, far past this);
- risky line: loss up by more than 10 % or agreement below 80 %.
Verdict from the CIs: each end of each CI falls in a zone (ok < risky < collapse); the verdict is
that zone when the best ends of both CIs and the worst ends lie in the same zone (``ok`` only when
the whole CIs clear the risky line, ``collapse`` only when one lies wholly beyond the collapse
line), and ``borderline`` when a CI straddles a line.  That verdict is about the mean over noise
draws; one training step sees one draw, so the same rule applied to the single-draw prediction
intervals gives ``draw_verdict``, printed beside it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from scipy import stats
from torch import nn

from harness.aqn.configs import AQNConfig
from harness.aqn.noise import NoiseInjector
from harness.eval.loss import answer_logprobs, answer_means, evaluate_loss
from harness.gsm8k import Gsm8kItem
from harness.inject import Coverage, QuantInjector

DRAWS, ITEMS, ANSWER_LINES = 8, 32, 1
ZONES = ("ok", "risky", "collapse")
VERDICTS = ("ok", "borderline", "risky", "collapse")


@dataclass(frozen=True)
class Thresholds:
    """The risky and collapse lines (see the module docstring for why these values)."""

    risky_loss_increase: float = 0.10
    risky_top1: float = 0.80
    collapse_loss_increase: float = 0.50
    collapse_top1: float = 0.50

    def loss_zone(self, increase: float) -> int:
        return 2 if increase > self.collapse_loss_increase else 1 if increase > self.risky_loss_increase else 0

    def top1_zone(self, agree: float) -> int:
        return 2 if agree < self.collapse_top1 else 1 if agree < self.risky_top1 else 0


@dataclass(frozen=True)
class Interval:
    """Mean, sd, the two-sided t confidence interval of the mean of D per-draw values
    (``mean ± t_{(1+c)/2, D-1} · sd / sqrt(D)``) and the prediction interval of one more draw
    (``mean ± t_{(1+c)/2, D-1} · sd · sqrt(1 + 1/D)``): a training step sees one draw, not the mean."""

    mean: float
    sd: float
    low: float
    high: float
    confidence: float = 0.95
    draw_low: float = -math.inf
    draw_high: float = math.inf

    @classmethod
    def over(cls, values: Sequence[float], confidence: float = 0.95) -> Interval:
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(mean, math.nan, -math.inf, math.inf, confidence)
        d = len(values)
        sd = statistics.stdev(values)
        t = float(stats.t.ppf((1 + confidence) / 2, d - 1))
        half, draw = t * sd / math.sqrt(d), t * sd * math.sqrt(1 + 1 / d)
        return cls(mean, sd, mean - half, mean + half, confidence, mean - draw, mean + draw)

    def single_draw(self) -> Interval:
        """The prediction interval as an :class:`Interval` (what :func:`verdict` judges for one draw)."""
        return dataclasses.replace(self, low=self.draw_low, high=self.draw_high)


def verdict(loss_increase: Interval, top1_agree: Interval, thresholds: Thresholds = Thresholds()) -> str:
    """ok / borderline / risky / collapse from the two CIs (module docstring)."""
    best = max(thresholds.loss_zone(loss_increase.low), thresholds.top1_zone(top1_agree.high))
    worst = max(thresholds.loss_zone(loss_increase.high), thresholds.top1_zone(top1_agree.low))
    return ZONES[best] if best == worst else "borderline"


@dataclass(frozen=True)
class PreflightResult:
    config: str
    sigma: float
    layer_types: tuple[str, ...]
    targets: int
    items: int
    answer_lines: int
    loss_quantized: float
    entropy_quantized: float
    draws: list[dict[str, float]]
    loss_increase: Interval
    top1_agree: Interval
    kl: Interval
    verdict: str  # about the mean over noise draws (the CIs)
    thresholds: Thresholds = field(default_factory=Thresholds)
    ci_method: str = "Student t over noise draws (items fixed)"
    coverage: dict = field(default_factory=dict)  # harness.inject.Coverage.to_json() of the quantization
    draw_verdict: str = ""  # about one draw, as one training step sees (the prediction intervals)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def coverage_line(self) -> str:
        return Coverage.from_json(self.coverage).line()


def preflight_items(items: Sequence[Gsm8kItem], answer_lines: int = ANSWER_LINES) -> list[Gsm8kItem]:
    """The items the pre-flight scores: answers cut to their first ``answer_lines`` lines (0: whole),
    sorted by text length so batches carry little padding (idempotent)."""
    if answer_lines < 0:
        raise ValueError(f"answer_lines must be >= 0 (0: whole answers), got {answer_lines}")
    cut = [
        Gsm8kItem(i.question, "\n".join(i.answer.split("\n")[:answer_lines]) if answer_lines else i.answer)
        for i in items
    ]
    return sorted(cut, key=lambda i: len(i.text))


def preflight(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    config: AQNConfig,
    *,
    fmt: str = "mxfp4",
    point: str = "weight",
    include: Sequence[str] | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    answer_lines: int = ANSWER_LINES,
    batch_size: int = 8,
    thresholds: Thresholds = Thresholds(),
    clean: list | None = None,
    allow_partial: bool = False,
) -> PreflightResult:
    """``draws`` noise draws (seeds ``seed`` … ``seed + draws - 1``) on ``preflight_items(items,
    answer_lines)``.  ``clean``: the noise-free quantized model's ``answer_logprobs`` on those
    items when the caller already has them (several configurations, one quantized model)."""
    config.schedule(total_steps=config.num_stages)  # invalid configurations raise before any noise
    if draws < 2:
        raise ValueError(f"draws must be >= 2 for a confidence interval, got {draws}")
    scored = preflight_items(items, answer_lines)
    per_draw = []
    with QuantInjector(model, fmt, point, seed=seed, allow_partial=allow_partial) as injector:
        if clean is None:
            clean = answer_logprobs(model, tokenizer, scored, batch_size=batch_size)
        loss_quantized, entropy_quantized = answer_means(clean)
        for d in range(draws):
            with NoiseInjector(model, config.layer_types, include=include, scale=config.scale, seed=seed + d) as noise:
                with noise.noisy(config.sigma_start):
                    result = evaluate_loss(model, tokenizer, scored, injector, against=clean, batch_size=batch_size)
            s = result.summary()
            per_draw.append(
                {
                    "seed": seed + d,
                    "loss_noisy": s["loss"],
                    "loss_increase": s["loss"] / loss_quantized - 1,
                    "top1_agree": s["top1_agree"],
                    "kl": s["kl"],
                    "entropy_noisy": s["entropy"],
                }
            )
    loss_ci = Interval.over([d["loss_increase"] for d in per_draw])
    top1_ci = Interval.over([d["top1_agree"] for d in per_draw])
    return PreflightResult(
        config=config.name,
        sigma=config.sigma_start,
        layer_types=config.layer_types,
        targets=noise.touched,
        items=s["n"],
        answer_lines=answer_lines,
        loss_quantized=loss_quantized,
        entropy_quantized=entropy_quantized,
        draws=per_draw,
        loss_increase=loss_ci,
        top1_agree=top1_ci,
        kl=Interval.over([d["kl"] for d in per_draw]),
        verdict=verdict(loss_ci, top1_ci, thresholds),
        thresholds=thresholds,
        coverage=injector.coverage.to_json(),
        draw_verdict=verdict(loss_ci.single_draw(), top1_ci.single_draw(), thresholds),
    )
