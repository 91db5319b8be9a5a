"""A short, seeded training loop under fake quantization with AQN (QeRL, Huang et al. 2025), and the
strategy comparison: every strategy trains for the same steps and seeds, then the quantized model's
answer loss is measured on held-out GSM8K test items.  The seed (one training run) is the unit
of every comparison, and an unquantized control trained with the same recipe tells adaptation to
the data apart from recovery from quantization.

What this tests: teacher-forced training (next-token NLL of GSM8K's gold answers) of the
RMSNorm weights through a straight-through estimator under W4A16 fake quantization, with AQN's
noise on the weights.  It is not QeRL's RL (GRPO rollouts sampled from the noisy policy, where the
noise acts as exploration): a result here says nothing about that mechanism."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from harness.aqn.configs import AQNConfig
from harness.aqn.noise import NoiseInjector
from harness.batching import padded_batches
from harness.eval.loss import EVAL_BATCH_SIZE, answer_logprobs, answer_loss, answer_means, answer_spans, evaluate_loss
from harness.eval.stats import compare_seeds, two_level_bootstrap_ci
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.modelview import ModelView
from harness.srdd.attribution import NEGLIGIBLE_DELTA, Label
from harness.srdd.document import AttributionEntry, ScanDocument
from harness.vocab import Vocab


class Strategy(Vocab, kind="AQN strategy", plural="AQN strategies"):
    """Which decoder layers get AQN noise while training (:func:`strategy_targets`)."""

    NONE = "none"  # no noise: fake quantization alone, the baseline every strategy is compared to
    GLOBAL = "global"  # every decoder layer (QeRL)
    TARGETED = "targeted"  # only the layers a scan's attribution found harmful (needs --attribution)
    HEALTHY = "healthy"  # every layer but the harmful ones (the targeted choice's control)


STRATEGIES = Strategy.choices()
SEEDS = 5  # training runs per strategy: the unit of every comparison
TRAIN_ITEMS = 256  # GSM8K train items the batches are drawn from


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
    strategy = Strategy.parse(strategy)
    chosen = {
        "none": None,
        "global": list(layers),
        "targeted": list(problematic),
        "healthy": [layer for layer in layers if layer not in problematic],
    }[strategy]
    return None if chosen is None else [f"{layer}.*" for layer in chosen]


@contextlib.contextmanager
def trainable_norms(model: nn.Module):
    """The norm weights (the model view's) trainable inside the context; every parameter's values
    and flags restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    norms = [n.module.weight for n in ModelView(model).norms()]
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
    fmt: str | None,
    config: AQNConfig | None,
    noise_include: Sequence[str] | None,
    settings: TrainSettings,
    untrained_quantized: list | None = None,
    eval_batch_size: int = EVAL_BATCH_SIZE,
) -> list[float]:
    """Train the norms for ``settings.steps`` under W4A16 ``fmt`` (``None``: unquantized, the
    control) + AQN if ``config`` and ``noise_include``, then return the per-item answer NLL sums
    on ``eval_items`` of the model as trained (quantized when ``fmt``; ``untrained_quantized``: the
    untrained quantized model's answer log-probs, saving a pass); the model is restored after."""
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    schedule = config.schedule(settings.steps) if config is not None else None
    spans = answer_spans(tokenizer, train_items)
    device = next(model.parameters()).device
    quant = QuantInjector(model, fmt, "weight", straight_through=True) if fmt else contextlib.nullcontext()
    with trainable_norms(model) as params, quant as injector:
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
        if injector is None:  # the control: the trained model itself, unquantized
            return evaluate_loss(model, tokenizer, eval_items, batch_size=eval_batch_size).reference_nll
        return evaluate_loss(
            model, tokenizer, eval_items, injector, against=untrained_quantized, batch_size=eval_batch_size
        ).nll


def harmful_layers(attribution: Sequence[AttributionEntry]) -> list[str]:
    """The layers the scan labels ``harmful`` (their exact Δloss CI from quantizing that layer
    alone lies above the negligible band δ, ``harness.srdd.attribution.label``: the rule that
    also decides problematic layers and the recommendation), worst first by exact Δloss."""
    rows = [a for a in attribution if a.layer != "all" and a.label == Label.HARMFUL.value]
    return [a.layer for a in sorted(rows, key=lambda a: (-a.delta_loss, a.layer))]


def problematic_layers(
    strategies: Sequence[str], scan_json: str | None, *, model: str, fmt: str
) -> tuple[list[str], str]:
    """The layers ``targeted`` noises and ``healthy`` spares, and how they were chosen:
    :func:`harmful_layers` of a scan document (``python -m harness scan --output SCAN.json``, which
    runs the attribution by default); without one none, and ``targeted``/``healthy`` are refused
    (any other choice would be a guess).  Unknown strategies are refused too; ``model`` and ``fmt``
    only name the scan command in the error."""
    for strategy in strategies:
        Strategy.parse(strategy)
    if scan_json is None:
        if {"targeted", "healthy"} & set(strategies):
            raise ValueError(
                "strategies targeted/healthy need --attribution SCAN.json with per-layer CIs "
                f"(python -m harness scan --model {model} --format {fmt} --output SCAN.json)"
            )
        return [], "no attribution given"
    doc = ScanDocument.read(scan_json)
    if not doc.attribution:
        raise ValueError(f"{scan_json}: a scan without attribution (rerun without --attribution none)")
    delta = doc.rules.get("negligible_delta", NEGLIGIBLE_DELTA)
    return harmful_layers(
        doc.attribution
    ), f"layers whose attribution CI of Δloss lies above δ = {delta:g} ({scan_json})"


CONTROL = "unquantized"  # trained with the same recipe, without quantization or noise


@dataclass
class StrategyComparison:
    """Per strategy (and the unquantized ``CONTROL``), one token-weighted eval loss per seed; the
    seeds are the unit of every comparison (harness.eval.stats.compare_seeds)."""

    fmt: str
    config: str
    strategies: list[str]
    seeds: list[int]
    steps: int
    settings: dict = field(default_factory=dict)
    eval_items: int = 0
    per_seed_loss: dict[str, list[float]] = field(default_factory=dict)
    per_run_items: dict[str, list[list[float]]] = field(default_factory=dict)  # per seed, per item
    item_tokens: list[int] = field(default_factory=list)  # answer tokens per evaluation item (the loss's weights)
    untrained_loss: float = float("nan")  # the unquantized model before training
    untrained_quantized_loss: float = float("nan")  # the quantized model before training
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """Per strategy: mean ± sd over seeds; vs ``none`` and the gap to the unquantized control,
        each paired by seed with its CI over seeds (items fixed), MDE, p, d_z and "significant" /
        "n.s.", plus ``ci_two_level``: the CI when seeds and items are both resampled
        (:func:`harness.eval.stats.two_level_bootstrap_ci`, token-weighted)."""
        out = []
        for s in [*self.strategies, CONTROL]:
            if s not in self.per_seed_loss:
                continue
            losses = self.per_seed_loss[s]
            row = {
                "strategy": s,
                "mean": statistics.mean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            }
            for label, ref in (("vs_none", "none"), ("gap", CONTROL)):
                if ref in self.per_seed_loss and s != ref:
                    row[label] = compare_seeds(self.per_seed_loss[ref], losses).as_dict()
                    if self.item_tokens and len(losses) > 1:
                        runs = self.per_run_items[ref], self.per_run_items[s]
                        row[label]["ci_two_level"] = list(two_level_bootstrap_ci(*runs, self.item_tokens))
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
    problematic: Sequence[str],
    layers: Sequence[str] | None = None,
    train_batch_size: int = TrainSettings.batch_size,
    eval_batch_size: int = EVAL_BATCH_SIZE,
    progress: bool = False,
) -> StrategyComparison:
    """Every strategy and the unquantized control, trained for the same steps on the same batches
    (one seed = one run of each), evaluated on ``eval_items``.  ``layers``: what ``global`` noises
    and ``healthy`` splits with ``targeted`` (default: every decoder layer of ``model``)."""
    config.schedule(steps)  # an invalid configuration fails before any training
    if layers is None:
        layers = ModelView(model).layer_names
    started = time.perf_counter()
    result = StrategyComparison(fmt, config.name, list(strategies), list(seeds), steps)
    result.eval_items = len(eval_items)
    result.settings = {k: v for k, v in asdict(TrainSettings(steps, train_batch_size)).items() if k != "seed"}
    untrained = evaluate_loss(model, tokenizer, eval_items, batch_size=eval_batch_size)
    with QuantInjector(model, fmt, "weight"):  # the untrained quantized model's outputs
        untrained_quantized = answer_logprobs(model, tokenizer, eval_items, batch_size=eval_batch_size)
    tokens = untrained.n_tokens
    result.item_tokens = list(tokens)
    result.untrained_loss = sum(untrained.reference_nll) / sum(tokens)
    result.untrained_quantized_loss = answer_means(untrained_quantized)[0]
    for strategy in [*strategies, CONTROL]:
        include = strategy_targets(strategy, layers, problematic) if strategy != CONTROL else None
        if strategy not in ("none", CONTROL) and not include:
            result.notes.append(f"{strategy}: no layers to noise (skipped)")
            continue
        runs = []
        for seed in seeds:
            nll = train_and_evaluate(
                model,
                tokenizer,
                train_items,
                eval_items,
                fmt=fmt if strategy != CONTROL else None,
                config=config if strategy not in ("none", CONTROL) else None,
                noise_include=include,
                settings=TrainSettings(steps=steps, batch_size=train_batch_size, seed=seed),
                untrained_quantized=untrained_quantized,
                eval_batch_size=eval_batch_size,
            )
            runs.append([x / t for x, t in zip(nll, tokens)])
            result.per_seed_loss.setdefault(strategy, []).append(sum(nll) / sum(tokens))
            if progress:
                print(f"  {strategy} seed {seed}: loss {result.per_seed_loss[strategy][-1]:.4f}", flush=True)
        result.per_run_items[strategy] = runs
    result.seconds = time.perf_counter() - started
    return result
