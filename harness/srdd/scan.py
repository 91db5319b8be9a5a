"""SRDD scans: what a format does to each Linear and each decoder layer.

- weight scan: every target weight against its quantization;
- activation scan: the input each Linear really quantizes under W16A4 (observed inside the
  injector, padding excluded); each Linear's activation-aware output error ‖(W−Q(W))X‖/‖WX‖ on its
  reference input when weights are quantized; each decoder layer's output **locally** (only that
  layer quantized, run on its reference input: the error the layer makes) and **cumulatively**
  (the fully quantized model: the error it inherits plus its own, a plot of error growth, never
  a verdict), reference vs quantized, with output SQNR and kurtosis over real non-sink tokens and
  the massive activation (largest |h|, where);
- gain scan: residual-branch gain ‖f(h+δ)−f(h)−δ‖/‖δ‖ of each decoder layer for a small seeded
  probe on real non-sink tokens, ref vs quantized;
- instability scan: the spread of each decoder layer's output across R seeded runs.
Loss attribution lives in ``harness.srdd.attribution``.  Everything is accumulated as sums batch
by batch: memory does not grow with the prompts.

Attention sinks: under the BOS policy (``harness.batching``) every text starts with the prefix
token, which the model uses as its attention sink and where it puts its massive activation
(SmolLM2: |h| ≈ 2.4e4 in one hidden dim).  Position 0 is that token; kurtosis and gain are taken
over the other real tokens (``SINK_POSITIONS``), the massive activation is reported on its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.batching import encode, padded_batches
from harness.formats import fake_quantize
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.modelview import ModelView, WeightKind
from harness.rng import DeviceGenerators
from harness.srdd.floors import gaussian_floor
from harness.srdd.metrics import (
    Moments,
    OutputErrorStats,
    Peak,
    QuantErrorStats,
    SpreadStats,
    clip_threshold,
    gain,
)

GAIN_PROBE_SCALE = 1e-2  # δ = 1e-2 · RMS(h over real non-sink tokens) · N(0, 1)
SINK_POSITIONS = 1  # position 0: the prefix (BOS) token, the attention sink


def real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Real (non-padding) tokens that are not attention sinks: mask and position ≥ SINK_POSITIONS."""
    keep = mask.bool().clone()
    keep[:, :SINK_POSITIONS] = False
    return keep


def real_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows of a module input ``x`` that belong to real tokens: ``x`` is (batch, tokens, ...)
    or flattened to (batch·tokens, ...) (OPT's MLP, MoE blocks and their experts)."""
    if x.shape[: keep.dim()] == keep.shape:
        return x[keep]
    if x.shape[0] == keep.numel():
        return x[keep.reshape(-1)]
    raise ValueError(f"an input of shape {tuple(x.shape)} does not line up with the batch's tokens {tuple(keep.shape)}")


def layer_of(module_name: str, layers: Sequence[str]) -> str | None:
    return next((layer for layer in layers if module_name.startswith(layer + ".")), None)


@dataclass
class ScanResult:
    """Per-Linear and per-decoder-layer accumulators of one scan."""

    modules: dict[str, dict[str, QuantErrorStats]] = field(default_factory=dict)  # name -> kind -> stats
    floors: dict[str, dict[str, QuantErrorStats]] = field(default_factory=dict)  # the same, Gaussian floor
    module_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    module_formats: dict[str, str] = field(default_factory=dict)
    output_error: dict[str, OutputErrorStats] = field(default_factory=dict)  # per Linear
    weight_peak: dict[str, float] = field(default_factory=dict)  # per Linear: max |w| / RMS(w)
    layer_outputs: dict[str, QuantErrorStats] = field(default_factory=dict)  # cumulative, non-sink tokens
    local_outputs: dict[str, QuantErrorStats] = field(default_factory=dict)  # the layer alone, non-sink
    local_kurtosis: dict[str, Moments] = field(default_factory=dict)
    local_peak: dict[str, Peak] = field(default_factory=dict)
    kurtosis_ref: dict[str, Moments] = field(default_factory=dict)
    kurtosis_quant: dict[str, Moments] = field(default_factory=dict)
    peak_ref: dict[str, Peak] = field(default_factory=dict)
    peak_quant: dict[str, Peak] = field(default_factory=dict)
    gain_ref: dict[str, float] = field(default_factory=dict)
    gain_quant: dict[str, float] = field(default_factory=dict)
    instability: dict[str, SpreadStats] = field(default_factory=dict)
    prompts: int = 0
    tokens: int = 0

    def add(self, name: str, kind: str, x: torch.Tensor, q: torch.Tensor, fmt: str, floor_shape) -> None:
        """Accumulate one (x, q) pair of Linear ``name`` and the Gaussian floor for its shape/RMS."""
        stats = self.modules.setdefault(name, {}).setdefault(kind, QuantErrorStats())
        stats.update(x, q, clip_threshold(x, fmt))
        self.module_formats[name] = fmt
        rms = QuantErrorStats().update(x, x).rms
        if math.isfinite(rms) and rms > 0:
            floor = gaussian_floor(fmt, tuple(floor_shape), rms)
            self.floors.setdefault(name, {}).setdefault(kind, QuantErrorStats()).merge(floor)


def weight_scan(
    model: nn.Module, fmt: str, result: ScanResult, *, exclude: Sequence[str] = (), allow_partial: bool = False
) -> None:
    """Every target weight, as (out, in), along its input dim against its quantization (``exclude``:
    module globs left unquantized); fused experts one expert at a time (``name[e]``), so a defect in
    one expert stands out."""
    for weight, f in QuantInjector(model, fmt, "weight", exclude=exclude, allow_partial=allow_partial).select():
        w = weight.matrix().detach()
        for name, m in [(f"{weight.name}[{e}]", w[e]) for e in range(len(w))] if w.dim() == 3 else [(weight.name, w)]:
            result.add(name, "weight", m, fake_quantize(m, f), f, m.shape)
            result.module_shapes[name] = tuple(m.shape)
            rms = float(m.float().pow(2).mean().sqrt())
            result.weight_peak[name] = float(m.float().abs().max()) / rms if rms > 0 else math.nan


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


def _texts(tokenizer, items: Sequence[Gsm8kItem]) -> list[list[int]]:
    return [encode(tokenizer, item.text) for item in items]


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
    exclude: Sequence[str] = (),
    allow_partial: bool = False,
) -> None:
    """Reference and quantized forward passes batch by batch; Linear inputs are observed inside
    the injector (what it really quantizes), each Linear's output error measured on its reference
    input when weights are quantized, each decoder layer quantized alone on its recorded reference
    input (local), and its output in the fully quantized model (cumulative)."""
    view = ModelView(model)
    layers = view.layers
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor | bool] = {"observe": True}

    def observe(name: str, kind: str, x: torch.Tensor, q: torch.Tensor, f: str) -> None:
        if kind == "input" and state["observe"]:
            keep = state["mask"]
            x, q = real_rows(x, keep), real_rows(q, keep)
            result.add(name, "input", x, q, f, (ACTIVATION_FLOOR_TOKENS, x.shape[-1]))

    quant_out: dict[str, torch.Tensor] = {}
    injector = QuantInjector(
        model, fmt, point, seed=seed, observer=observe, exclude=exclude, allow_partial=allow_partial
    )
    selected = injector.select()
    with injector:
        for weight, _ in selected:
            result.module_shapes[weight.name] = tuple(weight.tensor.shape)
        batches = padded_batches(
            tokenizer, _texts(tokenizer, items), batch_size, device, desc="scan", progress=progress
        )
        weights = selected if point in ("weight", "both") else []
        for input_ids, mask in batches:
            keep = mask.bool()
            state["mask"] = keep
            with injector.paused(), _output_errors(weights, keep, result):
                record = record_layers(model, input_ids, mask)
            ref_out = record.outputs
            state["observe"] = False
            local_out = {}
            for name, layer in layers:
                with injector.restricted(lambda m, p=name + ".": m.startswith(p)):
                    local_out[name] = record.inputs[name].run(layer, record.inputs[name].hidden)
            state["observe"] = True
            with _capture_layer_outputs(layers, quant_out):
                view.body(input_ids=input_ids, attention_mask=mask, use_cache=False)
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[keep]
            body = real_tokens(mask)
            for name, _ in layers:
                r, q, loc = ref_out[name], quant_out[name], local_out[name]
                result.layer_outputs.setdefault(name, QuantErrorStats()).update(r[body], q[body])
                result.local_outputs.setdefault(name, QuantErrorStats()).update(r[body], loc[body])
                result.kurtosis_ref.setdefault(name, Moments()).update(r[body])
                result.kurtosis_quant.setdefault(name, Moments()).update(q[body])
                result.local_kurtosis.setdefault(name, Moments()).update(loc[body])
                result.peak_ref.setdefault(name, Peak()).update(r[keep], positions)
                result.peak_quant.setdefault(name, Peak()).update(q[keep], positions)
                result.local_peak.setdefault(name, Peak()).update(loc[keep], positions)
            result.prompts += len(input_ids)
            result.tokens += int(keep.sum())


ACTIVATION_FLOOR_TOKENS = 256  # rows of the Gaussian tensor that describes an activation's floor


@contextlib.contextmanager
def _output_errors(selected, keep: torch.Tensor, result: ScanResult) -> Iterator[None]:
    """While active, every selected Linear (Conv1D, router) adds ‖(W−Q(W))X‖², ‖WX‖² of its
    real-token input X.  Fused experts are left out: each sees only its routed tokens."""

    def hook(weight, fmt: str):
        def fn(mod, args):
            w = weight.matrix().detach()
            stats = result.output_error.setdefault(weight.name, OutputErrorStats())
            stats.update(real_rows(args[0], keep), w, fake_quantize(w, fmt))

        return fn

    handles = [w.module.register_forward_pre_hook(hook(w, f)) for w, f in selected if w.kind is not WeightKind.EXPERTS]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    allow_partial: bool = False,
    exclude: Sequence[str] = (),
) -> None:
    """Each decoder layer's residual-branch gain for a seeded probe at its real input (probe
    and RMS over real non-sink tokens, zero on the sink and on padding), reference vs quantized."""
    layers = ModelView(model).layers
    input_ids, mask = _one_batch(model, tokenizer, items)
    captured = record_layers(model, input_ids, mask).inputs
    keep = real_tokens(mask)
    probes = DeviceGenerators(seed)
    with QuantInjector(model, fmt, point, seed=seed, exclude=exclude, allow_partial=allow_partial) as injector:
        for name, layer in layers:
            hidden = captured[name].hidden
            rms = hidden[keep].pow(2).mean().sqrt()
            delta = (
                torch.randn(hidden.shape, generator=probes(hidden.device), device=hidden.device).to(hidden)
                * GAIN_PROBE_SCALE
                * rms
                * keep[..., None]
            )

            def f(h, layer=layer, inputs=captured[name]):
                return inputs.run(layer, h)

            with injector.paused():
                result.gain_ref[name] = gain(f, hidden, delta, keep)
            result.gain_quant[name] = gain(f, hidden, delta, keep)


@dataclass
class LayerInputs:
    """What a decoder layer was called with: its hidden states and the other arguments."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return (self.args[0] if self.args else self.kwargs["hidden_states"]).detach()

    def run(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden states for input ``h`` and the captured other arguments."""
        out = layer(h, *self.args[1:], **self.kwargs) if self.args else layer(**{**self.kwargs, "hidden_states": h})
        return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerRecord:
    """One forward pass of the decoder stack: each layer's inputs, each layer's output hidden
    states and the stack's normed final hidden states."""

    inputs: dict[str, LayerInputs]
    outputs: dict[str, torch.Tensor]
    final: torch.Tensor


def record_layers(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, *, trace: bool = False) -> LayerRecord:
    """One forward pass of the decoder stack (as the model is now), recording every layer's inputs
    and outputs.  ``trace``: the first layer's hidden input is a fresh leaf requiring gradients and
    the outputs stay in a graph that starts there (the embeddings need no gradient); otherwise no
    graph is built."""
    view = ModelView(model)
    layers = view.layers
    inputs: dict[str, LayerInputs] = {}
    outputs: dict[str, torch.Tensor] = {}

    def grab(name: str, first: bool):
        def fn(module, args, kwargs):
            if first and trace:
                if args:
                    args = (args[0].detach().requires_grad_(), *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}
            inputs[name] = LayerInputs(args, kwargs)
            return args, kwargs

        return fn

    def keep(name: str):
        def fn(module, args, kwargs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [m.register_forward_pre_hook(grab(n, i == 0), with_kwargs=True) for i, (n, m) in enumerate(layers)]
    handles += [m.register_forward_hook(keep(n), with_kwargs=True) for n, m in layers]
    try:
        with torch.set_grad_enabled(trace):
            final = view.body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return LayerRecord(inputs, outputs, final)


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
    allow_partial: bool = False,
    exclude: Sequence[str] = (),
) -> None:
    """Spread of each decoder layer's output across ``runs`` quantized runs with different seeds
    (each run re-quantizes from scratch): > 0 only for stochastic formats."""
    if runs < 2:
        raise ValueError(f"instability needs at least 2 runs, got {runs}")
    view = ModelView(model)
    layers = view.layers
    input_ids, mask = _one_batch(model, tokenizer, items)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    for r in range(runs):
        sink: dict[str, torch.Tensor] = {}
        with (
            QuantInjector(model, fmt, point, seed=seed + 1000 * (r + 1), exclude=exclude, allow_partial=allow_partial),
            _capture_layer_outputs(layers, sink),
        ):
            view.body(input_ids=input_ids, attention_mask=mask, use_cache=False)
        for name, _ in layers:
            outputs[name].append(sink[name][mask.bool()])
    for name, _ in layers:
        result.instability[name] = SpreadStats().update(torch.stack(outputs[name]))
