"""A short, seeded training loop under fake quantization with AQN, and the strategy comparison
(design §6): every strategy trains for the same steps and seeds, then the quantized model's
answer loss is measured on held-out GSM8K test items and compared item by item."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.aqn.configs import AQNConfig
from harness.aqn.noise import NoiseInjector, is_rmsnorm
from harness.batching import padded_batches
from harness.data import Gsm8kItem
from harness.eval.loss import LossResult, answer_loss, answer_spans, evaluate_loss, reference_logprobs
from harness.eval.stats import compare_paired
from harness.inject import QuantInjector

STRATEGIES = ("none", "global", "targeted", "healthy")


@dataclass(frozen=True)
class TrainSettings:
    """Trainable RMSNorm weights (QeRL trains LoRA; norms are the cheapest trainable subset that
    AQN perturbs), AdamW, W4A16 through the injector's straight-through estimator."""

    steps: int = 20
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0


def strategy_targets(strategy: str, layers: Sequence[str], problematic: Sequence[str]) -> list[str] | None:
    """Module globs that get noise: None for no noise; global = every decoder layer."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown AQN strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    chosen = {
        "none": None,
        "global": list(layers),
        "targeted": list(problematic),
        "healthy": [layer for layer in layers if layer not in problematic],
    }[strategy]
    return None if chosen is None else [f"{layer}.*" for layer in chosen]


@contextlib.contextmanager
def trainable_norms(model: nn.Module):
    """RMSNorm weights trainable inside the context; every parameter's values and flags restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    norms = [m.weight for m in model.modules() if is_rmsnorm(m)]
    saved = [p.detach().clone() for p in norms]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in norms:
            p.requires_grad_(True)
        yield norms
    finally:
        with torch.no_grad():
            for p, s in zip(norms, saved):
                p.copy_(s)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def train_and_evaluate(
    model: nn.Module,
    tokenizer,
    train_items: Sequence[Gsm8kItem],
    eval_items: Sequence[Gsm8kItem],
    *,
    fmt: str,
    config: AQNConfig | None,
    noise_include: Sequence[str] | None,
    settings: TrainSettings,
    reference: list | None = None,
) -> LossResult:
    """Train the norms for ``settings.steps`` under W4A16 ``fmt`` (+ AQN if ``config`` and
    ``noise_include``), evaluate the quantized loss on ``eval_items``, restore the model."""
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    schedule = config.schedule(settings.steps) if config is not None else None
    spans = answer_spans(tokenizer, train_items)
    device = next(model.parameters()).device
    with trainable_norms(model) as params, QuantInjector(model, fmt, "weight", straight_through=True) as injector:
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        noise_ctx = (
            NoiseInjector(model, config.layer_types, include=noise_include, scale=config.scale, seed=settings.seed)
            if schedule is not None and noise_include
            else None
        )
        with noise_ctx if noise_ctx is not None else contextlib.nullcontext() as noise:
            model.train()
            for step in range(settings.steps):
                chosen = rng.sample(range(len(spans)), settings.batch_size)
                batch = [spans[i] for i in chosen]
                input_ids, mask = next(padded_batches(tokenizer, [ids for ids, _ in batch], len(batch), device))
                lengths = [(len(ids), start) for ids, start in batch]
                sigma = schedule.sigma_at(step) if noise is not None else 0.0
                with noise.noisy(sigma) if noise is not None else contextlib.nullcontext():
                    loss = answer_loss(model, input_ids, mask, lengths)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.eval()
        return evaluate_loss(model, tokenizer, eval_items, injector, reference=reference)


@dataclass
class StrategyComparison:
    fmt: str
    config: str
    strategies: list[str]
    seeds: list[int]
    steps: int
    per_seed_loss: dict[str, list[float]] = field(default_factory=dict)
    per_item_loss: dict[str, list[float]] = field(default_factory=dict)  # mean over seeds
    reference_loss: float = float("nan")
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        base = statistics.mean(self.per_seed_loss["none"]) if "none" in self.per_seed_loss else None
        glob = statistics.mean(self.per_seed_loss["global"]) if "global" in self.per_seed_loss else None
        out = []
        for s in self.strategies:
            if s not in self.per_seed_loss:
                continue
            losses = self.per_seed_loss[s]
            row = {
                "strategy": s,
                "mean": statistics.mean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            }
            for label, ref_name, ref in (("vs_none", "none", base), ("vs_global", "global", glob)):
                if ref is None or s == ref_name:
                    continue
                cmp = compare_paired(self.per_item_loss[ref_name], self.per_item_loss[s])
                row |= {
                    f"{label}_pct": 100 * (row["mean"] / ref - 1),
                    f"{label}_p": cmp.p_value,
                    f"{label}_d": cmp.cohens_d,
                    f"{label}_significant": cmp.significant,
                    "n_items": cmp.n,
                }
            out.append(row)
        return out


def compare_strategies(
    model: nn.Module,
    tokenizer,
    train_items: Sequence[Gsm8kItem],
    eval_items: Sequence[Gsm8kItem],
    *,
    fmt: str,
    config: AQNConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    layers: Sequence[str],
    problematic: Sequence[str],
    progress: bool = False,
) -> StrategyComparison:
    config.schedule(steps)  # an invalid configuration fails before any training
    started = time.perf_counter()
    result = StrategyComparison(fmt, config.name, list(strategies), list(seeds), steps)
    with QuantInjector(model, fmt, "weight"):  # the untrained quantized model's outputs
        reference = reference_logprobs(model, tokenizer, eval_items)
    for strategy in strategies:
        include = strategy_targets(strategy, layers, problematic)
        if strategy != "none" and not include:
            result.notes.append(f"{strategy}: no layers to noise (skipped)")
            continue
        runs = []
        for seed in seeds:
            res = train_and_evaluate(
                model,
                tokenizer,
                train_items,
                eval_items,
                fmt=fmt,
                config=config if strategy != "none" else None,
                noise_include=include,
                settings=TrainSettings(steps=steps, seed=seed),
                reference=reference,
            )
            runs.append(res)
            if progress:
                print(f"  {strategy} seed {seed}: loss {res.summary()['loss']:.4f}", flush=True)
        result.per_seed_loss[strategy] = [r.summary()["loss"] for r in runs]
        per_item = [r.item_losses(r.nll) for r in runs]
        result.per_item_loss[strategy] = [statistics.mean(v) for v in zip(*per_item)]
        result.reference_loss = runs[0].summary()["reference_loss"]
    result.seconds = time.perf_counter() - started
    return result
