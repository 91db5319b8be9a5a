"""SRDD scans (design §5): what a format does to each Linear and each decoder layer.

- weight scan: every target weight against its quantization;
- activation scan: the input each Linear really quantizes under W16A4 (observed inside the
  injector, padding excluded), and each decoder layer's output, reference vs quantized model,
  with the kurtosis of both;
- gain scan: ‖f(h+δ)−f(h)‖/‖δ‖ of each decoder layer for a small seeded probe, ref vs quantized;
- instability scan: the spread of each decoder layer's output across R seeded runs;
- loss attribution: quantize one decoder layer at a time, and all but one, and measure Δloss
  and KL(ref ‖ quant) against the reference.
Everything is accumulated as sums batch by batch: memory does not grow with the prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from harness.batching import padded_batches
from harness.data import Gsm8kItem
from harness.eval.loss import evaluate_loss, reference_logprobs
from harness.formats import fake_quantize, representable_max
from harness.inject import QuantInjector
from harness.rng import DeviceGenerators
from harness.srdd.metrics import Moments, QuantErrorStats, SpreadStats, gain

GAIN_PROBE_SCALE = 1e-2  # δ = 1e-2 · RMS(h) · N(0, 1)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks, in order: the children of the model's ``*.layers`` ModuleList."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers named layers/h/blocks")


def layer_of(module_name: str, layers: Sequence[str]) -> str | None:
    return next((layer for layer in layers if module_name.startswith(layer + ".")), None)


@dataclass
class ScanResult:
    """Per-Linear and per-decoder-layer accumulators of one scan."""

    modules: dict[str, dict[str, QuantErrorStats]] = field(default_factory=dict)  # name -> kind -> stats
    module_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layer_outputs: dict[str, QuantErrorStats] = field(default_factory=dict)
    kurtosis_ref: dict[str, Moments] = field(default_factory=dict)
    kurtosis_quant: dict[str, Moments] = field(default_factory=dict)
    gain_ref: dict[str, float] = field(default_factory=dict)
    gain_quant: dict[str, float] = field(default_factory=dict)
    instability: dict[str, SpreadStats] = field(default_factory=dict)
    attribution: list[dict] = field(default_factory=list)
    prompts: int = 0
    tokens: int = 0


def weight_scan(model: nn.Module, fmt: str, result: ScanResult, **select) -> None:
    """Every target Linear's weight (along its input dim) against its quantization."""
    for name, module, f in QuantInjector(model, fmt, "weight", **select).select():
        w = module.weight.detach()
        stats = result.modules.setdefault(name, {}).setdefault("weight", QuantErrorStats())
        stats.update(w, fake_quantize(w, f), representable_max(w, f))
        result.module_shapes[name] = tuple(w.shape)


@contextlib.contextmanager
def _capture_layer_outputs(layers: Sequence[tuple[str, nn.Module]], sink: dict[str, torch.Tensor]) -> Iterator[None]:
    def hook(name: str):
        def fn(module, args, output):
            sink[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _body(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head: scans need layer outputs, not 49k-way logits."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _texts(tokenizer, items: Sequence[Gsm8kItem]) -> list[list[int]]:
    return [tokenizer(item.text)["input_ids"] for item in items]


def _one_batch(model: nn.Module, tokenizer, items: Sequence[Gsm8kItem]) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    return next(padded_batches(tokenizer, _texts(tokenizer, items), len(items), device))


@torch.no_grad()
def activation_scan(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    result: ScanResult,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    **select,
) -> None:
    """Reference and quantized forward passes batch by batch; Linear inputs are observed inside
    the injector (what it really quantizes), decoder-layer outputs compared across the passes."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor] = {}

    def observe(name: str, kind: str, x: torch.Tensor, q: torch.Tensor, f: str) -> None:
        if kind != "input":
            return
        keep = state["mask"]
        x, q = x[keep], q[keep]
        stats = result.modules.setdefault(name, {}).setdefault("input", QuantErrorStats())
        stats.update(x, q, representable_max(x, f))

    ref_out: dict[str, torch.Tensor] = {}
    quant_out: dict[str, torch.Tensor] = {}
    injector = QuantInjector(model, fmt, point, seed=seed, observer=observe, **select)
    with injector:
        for name, module, _ in injector.select():
            result.module_shapes[name] = tuple(module.weight.shape)
        batches = padded_batches(
            tokenizer, _texts(tokenizer, items), batch_size, device, desc="scan", progress=progress
        )
        for input_ids, mask in batches:
            keep = mask.bool()
            state["mask"] = keep
            with injector.paused(), _capture_layer_outputs(layers, ref_out):
                _body(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
            with _capture_layer_outputs(layers, quant_out):
                _body(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
            for name, _ in layers:
                r, q = ref_out[name][keep], quant_out[name][keep]
                result.layer_outputs.setdefault(name, QuantErrorStats()).update(r, q)
                result.kurtosis_ref.setdefault(name, Moments()).update(r)
                result.kurtosis_quant.setdefault(name, Moments()).update(q)
            result.prompts += len(input_ids)
            result.tokens += int(keep.sum())


@torch.no_grad()
def gain_scan(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    result: ScanResult,
    *,
    seed: int = 0,
    **select,
) -> None:
    """Each decoder layer's gain for a seeded probe at its real input, reference vs quantized."""
    layers = decoder_layers(model)
    captured: dict[str, tuple[tuple, dict]] = {}

    def grab(name: str):
        def fn(module, args, kwargs):
            captured[name] = (args, kwargs)

        return fn

    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in layers]
    try:
        input_ids, mask = _one_batch(model, tokenizer, items)
        _body(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    probes = DeviceGenerators(seed)
    with QuantInjector(model, fmt, point, seed=seed, **select) as injector:
        for name, layer in layers:
            args, kwargs = captured[name]
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            delta = (
                torch.randn(hidden.shape, generator=probes(hidden.device), device=hidden.device).to(hidden)
                * GAIN_PROBE_SCALE
                * hidden.pow(2).mean().sqrt()
            )

            def f(h, args=args, kwargs=kwargs, layer=layer):
                if args:
                    out = layer(h, *args[1:], **kwargs)
                else:
                    out = layer(**{**kwargs, "hidden_states": h})
                return (out[0] if isinstance(out, tuple) else out)[mask.bool()]

            with injector.paused():
                result.gain_ref[name] = gain(f, hidden, delta)
            result.gain_quant[name] = gain(f, hidden, delta)


@torch.no_grad()
def instability_scan(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    result: ScanResult,
    *,
    runs: int = 5,
    seed: int = 0,
    **select,
) -> None:
    """Spread of each decoder layer's output across ``runs`` quantized runs with different seeds
    (each run re-quantizes from scratch): > 0 only for stochastic formats."""
    if runs < 2:
        raise ValueError(f"instability needs at least 2 runs, got {runs}")
    layers = decoder_layers(model)
    input_ids, mask = _one_batch(model, tokenizer, items)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    for r in range(runs):
        sink: dict[str, torch.Tensor] = {}
        with (
            QuantInjector(model, fmt, point, seed=seed + 1000 * (r + 1), **select),
            _capture_layer_outputs(layers, sink),
        ):
            _body(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        for name, _ in layers:
            outputs[name].append(sink[name][mask.bool()])
    for name, _ in layers:
        result.instability[name] = SpreadStats().update(torch.stack(outputs[name]))


def loss_attribution(
    model: nn.Module,
    tokenizer,
    items: Sequence[Gsm8kItem],
    fmt: str,
    point: str,
    result: ScanResult,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> None:
    """Δloss and KL of quantizing each decoder layer alone, and all layers but it, plus all."""
    layers = [name for name, _ in decoder_layers(model)]
    reference = reference_logprobs(model, tokenizer, items, batch_size=batch_size)

    def run(injector: QuantInjector) -> dict[str, float]:
        s = evaluate_loss(model, tokenizer, items, injector, reference=reference, batch_size=batch_size).summary()
        return {"delta_loss": s["loss"] - s["reference_loss"], "kl": s["kl"], "reference_loss": s["reference_loss"]}

    with QuantInjector(model, fmt, point, seed=seed) as injector:
        result.attribution.append({"layer": "all", "only": run(injector), "all_but": None})
        for layer in tqdm(layers, desc="attribution", unit="layer", disable=not progress):
            prefix = layer + "."
            with injector.restricted(lambda name, p=prefix: name.startswith(p)):
                only = run(injector)
            with injector.restricted(lambda name, p=prefix: not name.startswith(p)):
                all_but = run(injector)
            result.attribution.append({"layer": layer, "only": only, "all_but": all_but})
