"""Applying a format to a model's Linear layers inside a context that always undoes itself:
weights (W4A16, as QeRL's fake-quantized training, Huang et al. 2025), inputs (W16A4) or both, per
module, with mixed-precision overrides."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from harness.formats import fake_quantize, get_format, nvfp4_per_tensor_scale
from harness.formats.quant import NVFP4_RANGE, PER_TENSOR_SCALE_MAX, PER_TENSOR_SCALE_MIN
from harness.modelview import ModelView, QuantWeight, WeightKind, experts_forward
from harness.recipes import check_formats, get_recipe
from harness.transforms import BlockRotation, check_transform
from harness.vocab import Vocab


class Point(Vocab, kind="injection point"):
    """Where :class:`QuantInjector` quantizes a target."""

    WEIGHT = "weight"  # its weight, along the input dim (W4A16, QeRL style)
    INPUT = "input"  # its input activation, along the hidden dim, per token (W16A4)
    BOTH = "both"  # weight and input (W4A4, or a recipe's two formats)


POINTS = Point.choices()

# Per Linear, the injectors active on it, innermost last: only the innermost one quantizes it.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[QuantInjector]] = weakref.WeakKeyDictionary()


def causal_at(fmt: str, point: str) -> bool:
    """Whether ``fmt`` may quantize at ``point`` with a scale computed per call: a block of a
    (tokens x hidden) activation must lie within one token, so 2-D tiles are for weights only,
    and a per-tensor activation scale is static (calibrated, see ``QuantInjector(calibration=)``)."""
    f = get_format(fmt)
    return point == "weight" or (len(f.block_shape) == 1 or f.grouping == "row")


@dataclass(frozen=True)
class InjectedModule:
    """One weight the injector touched: its name, shape (as stored), format (the weight's, or the
    input's at point ``input``), point and kind."""

    name: str
    shape: tuple[int, ...]
    format: str
    point: str
    kind: str = WeightKind.LINEAR.value
    input_format: str | None = None  # the input's format when it differs from the weight's (recipes)


COVERAGE_SCHEMA = 1


@dataclass(frozen=True)
class Coverage:
    """How much of the decoder layers' weights (tensors of 2 or more dims; norms and biases
    excluded) an injector quantizes, counted in parameters.  ``requested``: the parameters the
    selection asked for (targets minus exclude and ``None`` overrides); ``quantized`` of those were
    reached; ``unreachable`` names what was asked for but cannot be quantized (a module type the
    model view does not know); ``kept`` what stays in high precision on purpose (the router by
    default, excluded and ``None``-overridden weights).  ``allowed_partial``: the user accepted
    ``quantized < requested``."""

    point: str
    quantized: int
    requested: int
    decoder: int
    kept: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()
    head: bool = False
    allowed_partial: bool = False
    schema_version: int = COVERAGE_SCHEMA

    @property
    def share(self) -> float:
        """Quantized parameters / all decoder weight parameters."""
        return self.quantized / self.decoder if self.decoder else 0.0

    @property
    def requested_share(self) -> float:
        """Quantized parameters / the parameters asked for (1.0 when nothing was asked)."""
        return self.quantized / self.requested if self.requested else 1.0

    @property
    def complete(self) -> bool:
        return self.quantized == self.requested

    def line(self) -> str:
        """One line for the first lines of a report."""
        what = "inputs of " if self.point == "input" else ""
        text = (
            f"quantized {what}{self.quantized:,} of {self.decoder:,} decoder weight parameters "
            f"({self.share:.1%}; {self.requested_share:.1%} of the {self.requested:,} asked for)"
            + (", lm_head too" if self.head else "")
        )
        if self.kept:
            text += f"; kept in high precision: {_names(self.kept)}"
        if not self.complete:
            text = f"PARTIAL (accepted with --allow-partial): {text}; cannot quantize: {_names(self.unreachable)}"
        return text

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "point": self.point,
            "quantized": self.quantized,
            "requested": self.requested,
            "decoder": self.decoder,
            "share": self.share,
            "requested_share": self.requested_share,
            "complete": self.complete,
            "kept": list(self.kept),
            "unreachable": list(self.unreachable),
            "head": self.head,
            "allowed_partial": self.allowed_partial,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Coverage:
        if doc.get("schema_version") != COVERAGE_SCHEMA:
            raise ValueError(f"coverage schema {doc.get('schema_version')!r}; this harness reads {COVERAGE_SCHEMA}")
        keys = ("point", "quantized", "requested", "decoder", "head", "allowed_partial")
        return cls(**{k: doc[k] for k in keys}, kept=tuple(doc["kept"]), unreachable=tuple(doc["unreachable"]))


def _names(names: Sequence[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


class StraightThrough(torch.autograd.Function):
    """Forward: the quantized value; backward: the gradient passes to the unquantized input
    unchanged (the straight-through estimator of Bengio et al., 2013)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Quantizer:
    """Fake-quantizes one module's weight or input and shows it to the injector's observer.

    ``rotation``: the block Hadamard applied before quantizing (undone after it when the other
    side of the Linear is not rotated, ``unrotate``); ``per_tensor_scale``: NVFP4's second level,
    per weight (``"amax"``) or from the calibrated input range; ``calibrated_amax``: a static
    per-tensor input range; ``keyed``: stochastic rounding keyed per item (see ``_item_keys``)."""

    def __init__(
        self,
        injector: QuantInjector,
        fmt: str,
        name: str,
        module: nn.Module,
        rotation: BlockRotation | None = None,
        unrotate: bool = False,
    ) -> None:
        self.injector = injector
        self.fmt = fmt
        self.name = name
        self.module = weakref.ref(module)
        self.rotation, self.unrotate = rotation, unrotate
        self.calibrated_amax: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        """On for this module, and this injector is the innermost one active on it."""
        stack = _ACTIVE.get(self.module(), [])
        return bool(stack) and stack[-1] is self.injector and self.injector.active_for(self.name)

    def _quantize(self, x: torch.Tensor, kind: str, axis: int = -1) -> torch.Tensor:
        if kind == "weight" and x.dim() == 3:  # fused experts (experts, out, in): each expert its own matrix,
            return torch.stack([self._quantize(w, kind, axis) for w in x])  # with its own per-tensor scale
        injector = self.injector
        fmt = get_format(self.fmt)
        v = self.rotation.rotate(x) if self.rotation is not None else x
        kw: dict = {"axis": axis, "scale_mode": injector.scale_mode}
        if fmt.grouping == "tensor" and kind == "input":
            kw["calibrated_amax"] = self.calibrated_amax
        if fmt.scale.supports_per_tensor_scale and injector.per_tensor_scale == "amax":
            if kind == "weight":
                kw["per_tensor_scale"] = nvfp4_per_tensor_scale(v)
            elif self.calibrated_amax is not None:
                kw["per_tensor_scale"] = (self.calibrated_amax / NVFP4_RANGE).clamp(
                    PER_TENSOR_SCALE_MIN, PER_TENSOR_SCALE_MAX
                )
        if fmt.stochastic and kind == "input" and injector.item_keys is not None and v.dim() >= 2:
            q = _keyed_rows(v, self.fmt, kw, injector.item_keys, self.name)
        else:
            q = fake_quantize(v, self.fmt, generator=injector.generator, **kw)
        if self.rotation is not None:
            q = (self.rotation.unrotate(q) if self.unrotate else q).to(x.dtype)
        return q

    def __call__(self, x: torch.Tensor, kind: str, axis: int = -1) -> torch.Tensor:
        q = self._quantize(x.detach(), kind, axis)
        if self.injector.observer is not None:
            self.injector.observer(self.name, kind, x.detach(), q, self.fmt)
        if self.injector.straight_through and torch.is_grad_enabled() and x.requires_grad:
            return StraightThrough.apply(x, q)
        return q


class _WeightParametrization(nn.Module):
    """``weight -> fake_quantize(weight)`` along the input dim (``axis``).  The quantized copy is
    computed once per version of the weight (an optimizer step bumps it) and reused on every forward."""

    def __init__(self, quantizer: _Quantizer, axis: int = -1) -> None:
        super().__init__()
        self.quantizer, self.axis = quantizer, axis
        self._key: tuple[int, int] | None = None
        self._cached: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        injector = self.quantizer.injector
        if not self.quantizer.active:
            return weight
        if injector.straight_through and torch.is_grad_enabled() and weight.requires_grad:
            return self.quantizer(weight, "weight", self.axis)
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            self._cached, self._key = self.quantizer(weight, "weight", self.axis), key
        return self._cached


class QuantInjector:
    """Context manager applying format ``fmt`` to a model's quantizable weights (the model view's:
    ``nn.Linear``, GPT-2's ``Conv1D``, fused MoE expert tensors, per expert; ``harness.modelview``).

    ``point``: ``weight`` quantizes each target's weight along its input dim (W4A16, QeRL style);
    ``input`` quantizes each target's input activation along the hidden dim, per token, in a
    forward pre-hook (W16A4; fused experts: each projection's input, inside their computation);
    ``both``.  ``targets``: name globs or module classes (default: every quantizable weight of the
    decoder layers except the MoE router; the head ``lm_head`` and the router only when named);
    ``exclude``: globs to leave alone; ``overrides``: ``{glob: format or None}`` for mixed precision
    (first matching glob wins; None keeps the weight in its original precision).  A glob in any of
    the three that matches no quantizable weight is a ValueError (a typo would otherwise quantize
    everything or nothing).  A weight asked for that the view cannot quantize (a module type it does
    not know) is a ValueError unless ``allow_partial=True``; :attr:`coverage` reports the share
    either way.
    ``straight_through=True`` lets gradients reach the unquantized weights and inputs (training).
    ``seed`` drives stochastic formats through one CPU generator that keys their Philox stream, so
    a seed quantizes alike on every device (or pass one ``generator``).  ``scale_mode``: the
    E8M0 shared-exponent rule of every format used (``harness.formats.SCALE_MODES``).
    ``observer(name, kind, x, q, fmt)``, if given, sees every tensor quantized (``kind`` is
    ``"weight"`` or ``"input"``): the SRDD scanner measures exactly what the model quantizes.

    Weights are never edited: each weight Parameter is wrapped by a parametrization and the very
    same Parameter object is put back on exit, also when the body raises, and every hook (and
    the experts' input-quantizing forward) is removed.  A tied ``lm_head`` (sharing its weight
    with the input embedding) is quantized where it is used as ``lm_head`` only; the embedding
    lookup keeps the original values, and ``notes`` says so.  ``modules`` lists what was touched
    (reset on every ``with``: one object can be entered again after it exits).

    Nesting: an injector entered inside another one wins on the modules both touch (the inner
    format replaces the outer one, it is not applied on top of it); when the inner one exits the
    outer one quantizes those modules again.  An architecture the model view does not know is a
    ValueError naming what it found.

    Recipes: ``weight=`` and ``input=`` name one format per side (``QuantInjector(model,
    weight="nvfp4", input="fp8_e4m3_row")``; ``fmt, point`` is the shorthand for the same format
    on the named side(s)), or ``recipe=`` a named pair (:mod:`harness.recipes`).
    ``per_tensor_scale="amax"``: NVFP4's two-level scale, ``amax / (448 * 6)`` of each weight
    (and of each calibrated input range); the NVFP4 recipes turn it on.  ``calibration``: token-id
    sequences (lists or 1-D tensors) run through the model on entry, one at a time, with the
    weights quantized and the inputs not, to fix static input scales: a max observer of each
    target's input ``|x|`` (after the transform) sets its per-tensor scale (``tensor`` input
    formats need it; NVFP4 inputs use it for their second level).  ``transform="hadamard"``:
    a block Hadamard (:mod:`harness.transforms`) of ``transform_size`` (default: the format's
    block size, 32 for a row or tensor format) along the input dim of every target, with seeded
    random signs when ``transform_seed`` is given: weight-only ``Q(W H) Hᵀ``, both ``Q(X H) Q(W H)ᵀ``.
    Stochastic formats at the input are keyed per item and position: a model-level pre-hook reads
    each row's ``input_ids`` (those under its ``attention_mask``), so an item's noise does not
    depend on its batch-mates or the batch size.
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: str | None = None,
        point: str = "weight",
        *,
        weight: str | None = None,
        input: str | None = None,
        recipe: str | None = None,
        per_tensor_scale: str | None = None,
        calibration: Sequence[Sequence[int] | torch.Tensor] | None = None,
        transform: str | None = None,
        transform_size: int | None = None,
        transform_seed: int | None = None,
        targets: Sequence[str | type] | None = None,
        exclude: Sequence[str] = (),
        overrides: dict[str, str | None] | None = None,
        straight_through: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        observer: Callable[[str, str, torch.Tensor, torch.Tensor, str], None] | None = None,
        scale_mode: str = "floor",
        allow_partial: bool = False,
    ) -> None:
        if generator is not None and seed is not None:
            raise ValueError("pass a generator or a seed, not both")
        point = Point.parse(point)
        sides = resolve_sides(fmt, point, weight, input, recipe, per_tensor_scale)
        fmt, point, weight, input, per_tensor_scale = sides
        check_transform(transform)
        at_input = [f for f in (input, *((overrides or {}).values() if input else ())) if f is not None]
        for f in (weight, input, *(overrides or {}).values()):
            if f is not None:
                get_format(f).with_scale_mode(scale_mode)
        for f in at_input:
            if get_format(f).static_at_input:
                if calibration is None:
                    raise ValueError(
                        f"format {f!r} at the input is static (one per-tensor scale, fixed in deployment): pass "
                        "calibration= (token-id sequences; the CLI uses its calibration prompts), or use a dynamic "
                        "per-token format such as fp8_e4m3_row or int8_row"
                    )
            elif not causal_at(f, "input"):
                raise ValueError(
                    f"format {f!r} cannot quantize activations (point {point!r}): its "
                    f"{'x'.join(map(str, get_format(f).block_shape))} tiles of a (tokens x hidden) input would mix "
                    "tokens, so a token's output would depend on later tokens and on its batch (non-causal); "
                    "use it at point 'weight', or a 1-D block format for activations"
                )
        self.model, self.fmt, self.point = model, fmt, point
        self.weight_format, self.input_format, self.per_tensor_scale = weight, input, per_tensor_scale
        self.calibration = None if calibration is None else list(calibration)
        self.transform, self.transform_size, self.transform_seed = transform, transform_size, transform_seed
        self.item_keys: list[int] | None = None
        self.targets, self.exclude, self.overrides = targets, tuple(exclude), dict(overrides or {})
        if seed is not None:  # a CPU generator keys the Philox stream on every device (formats.philox)
            generator = torch.Generator().manual_seed(seed)
        self.straight_through, self.generator, self.observer = straight_through, generator, observer
        self.scale_mode, self.allow_partial = scale_mode, allow_partial
        self.modules: list[InjectedModule] = []
        self.notes: list[str] = []
        self.coverage: Coverage | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._parametrized: list[tuple[nn.Module, str, _WeightParametrization]] = []
        self._forwards: list[tuple[nn.Module, object]] = []  # (experts module, the forward it had)
        self._touched: list[nn.Module] = []
        self._input_quantizers: list[_Quantizer] = []
        self._expert_inputs: set[str] = set()  # inputs quantized inside fused experts (not calibrated)
        self._calibrating = False
        self._active: Callable[[str], bool] = lambda name: True

    def active_for(self, name: str) -> bool:
        """Whether the module ``name`` is quantized right now (see :meth:`restricted`)."""
        return self._active(name)

    @contextlib.contextmanager
    def restricted(self, active: Callable[[str], bool]) -> Iterator[None]:
        """Quantize only the modules for which ``active(name)`` is true inside the context,
        reusing the quantized weights (loss attribution toggles layers this way)."""
        previous, self._active = self._active, active
        try:
            yield
        finally:
            self._active = previous

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Run the original model inside the context (e.g. the reference pass of a comparison)."""
        return self.restricted(lambda name: False)

    def select(self) -> list[tuple[QuantWeight, str]]:
        """``(weight, format)`` of every weight this injector quantizes (nothing applied); sets
        :attr:`coverage`.  Raises ValueError for a glob that matches nothing and, unless
        ``allow_partial``, for a weight asked for that cannot be quantized."""
        view = ModelView(self.model)
        candidates = view.weights()
        unreachable = view.unreachable()
        names = [w.name for w in candidates] + [n for n, _ in unreachable]

        def matches(name: str, globs: Sequence[str]) -> bool:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)

        for option, globs in (("target", self.targets or ()), ("exclude", self.exclude), ("override", self.overrides)):
            for g in globs:
                if isinstance(g, str) and not any(fnmatch.fnmatchcase(n, g) for n in names):
                    raise ValueError(
                        f"{option} {g!r} matches no quantizable weight of {type(self.model).__name__} "
                        f"(names look like: {', '.join(names[:3])}, ..., {candidates[-1].name})"
                    )
        if self.targets is None:
            asked = [w for w in candidates if w.layer is not None and w.kind is not WeightKind.ROUTER]
            kept = [w.name for w in candidates if w.kind is WeightKind.ROUTER]
            missing = [(n, k) for n, k in unreachable if not matches(n, self.exclude)]
        else:
            globs = [t for t in self.targets if isinstance(t, str)]
            classes = tuple(t for t in self.targets if isinstance(t, type))
            asked = [w for w in candidates if matches(w.name, globs) or isinstance(w.module, classes)]
            kept = []
            missing = [(n, k) for n, k in unreachable if matches(n, globs) and not matches(n, self.exclude)]
        selected = []
        for w in asked:
            fmt = (
                None
                if matches(w.name, self.exclude)
                else next((f for g, f in self.overrides.items() if fnmatch.fnmatchcase(w.name, g)), self.fmt)
            )
            if fmt is None:
                kept.append(w.name)
            else:
                selected.append((w, fmt))
        decoder = [w for w, _ in selected if w.layer is not None]
        quantized = sum(w.parameter().numel() for w in decoder)
        self.coverage = Coverage(
            point=self.point,
            quantized=quantized,
            requested=quantized + sum(k for _, k in missing),
            decoder=view.decoder_weight_numel(),
            kept=tuple(kept),
            unreachable=tuple(n for n, _ in missing),
            head=any(w.layer is None for w, _ in selected),
            allowed_partial=self.allow_partial,
        )
        if missing and not self.allow_partial:
            raise ValueError(
                f"cannot quantize {len(missing)} weight(s) asked for in {type(self.model).__name__}, "
                f"{1 - self.coverage.requested_share:.1%} of what was asked: {_names([n for n, _ in missing])} "
                "(a module type the model view does not know); exclude them, or accept a partial result with "
                "--allow-partial (allow_partial=True)"
            )
        return selected

    def __enter__(self) -> QuantInjector:
        if self._touched:
            raise RuntimeError("this QuantInjector is already active; it is not re-entrant")
        self.modules, self.notes = [], []
        try:
            embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            experts: dict[nn.Module, dict[str, _Quantizer]] = {}
            for weight, fmt in self.select():
                module, name = weight.module, weight.name
                wfmt, ifmt = self._sides(fmt)
                rotation = self._rotation(weight, wfmt or ifmt)
                quantizer = _Quantizer(self, wfmt or fmt, name, module, rotation, unrotate=ifmt is None)
                input_quantizer = _Quantizer(self, ifmt or fmt, name, module, rotation, unrotate=wfmt is None)
                _ACTIVE.setdefault(module, []).append(self)
                self._touched.append(module)
                if self.point in ("weight", "both"):
                    if weight.parameter().device.type == "meta":
                        raise ValueError(
                            f"{weight.name}.{weight.param} is offloaded (device_map placed it on disk or the CPU): "
                            "weight quantization needs the weights in place; use point=input or give it more max_memory"
                        )
                    if embedding is not None and weight.parameter() is getattr(embedding, "weight", None):
                        self.notes.append(
                            f"{weight.name}.weight is tied to the input embedding: {weight.name} uses {fmt} weights, "
                            "the embedding lookup keeps the original weights"
                        )
                    # square 2-D tiles of (in, out) are the transposes of those of (out, in): any axis is the input's
                    axis = weight.axis if len(get_format(fmt).block_shape) == 1 else -1
                    parametrization = _WeightParametrization(quantizer, axis)
                    parametrize.register_parametrization(module, weight.param, parametrization, unsafe=True)
                    self._parametrized.append((module, weight.param, parametrization))
                if self.point in ("input", "both"):
                    if weight.kind is WeightKind.EXPERTS:
                        if get_format(input_quantizer.fmt).static_at_input:
                            raise ValueError(
                                f"{name}: a static (per-tensor, calibrated) input format on fused experts is not "
                                f"supported ({input_quantizer.fmt}); use a per-token format such as fp8_e4m3_row"
                            )
                        experts.setdefault(module, {})[weight.param] = input_quantizer
                        self._expert_inputs.add(name)
                    else:
                        self._hooks.append(module.register_forward_pre_hook(_input_hook(input_quantizer)))
                    self._input_quantizers.append(input_quantizer)
                self.modules.append(
                    InjectedModule(
                        name,
                        tuple(weight.parameter().shape),
                        wfmt or ifmt,
                        self.point,
                        weight.kind.value,
                        input_format=ifmt if wfmt else None,
                    )
                )
            for module, quantizers in experts.items():
                self._forwards.append((module, module.__dict__.get("forward")))
                module.forward = _experts_input_forward(module, quantizers)
            self._key_items()
            self._calibrate()
        except BaseException:
            self._restore()
            raise
        return self

    def _sides(self, fmt: str) -> tuple[str | None, str | None]:
        """(weight format, input format) of a module whose selected format is ``fmt``: the
        injector's pair, or an override's format on the active side(s)."""
        default = self.weight_format or self.input_format
        if fmt == default:
            return self.weight_format, self.input_format
        return (fmt if self.point in ("weight", "both") else None), (fmt if self.point in ("input", "both") else None)

    def _rotation(self, weight: QuantWeight, fmt: str) -> BlockRotation | None:
        if self.transform is None:
            return None
        if weight.axis != -1:
            raise ValueError(
                f"transform={self.transform!r} rotates along the last dim; {weight.name} stores its input dim first "
                f"({weight.kind.value}), which the transform does not support"
            )
        f = get_format(fmt)
        size = self.transform_size or (f.block_shape[-1] if f.block_shape else 32)
        rotation = BlockRotation(size, self.transform_seed)
        rotation.check(weight.parameter().shape[-1], weight.name)
        return rotation

    def _key_items(self) -> None:
        """With a stochastic format at the input, key its draws per item (``_item_keys``)."""
        if any(get_format(q.fmt).stochastic for q in self._input_quantizers):
            seed = int(torch.randint(0, 2**62, (), generator=self.generator)) if self.generator is not None else 0
            self._hooks.append(self.model.register_forward_pre_hook(_item_keys(self, seed), with_kwargs=True))

    def _calibrate(self) -> None:
        """Max observer of every static input's ``|x|`` (after the transform) over the calibration
        sequences, run one at a time with the weights quantized and the inputs not."""
        needs = [
            q
            for q in self._input_quantizers
            if q.name not in self._expert_inputs
            and (
                get_format(q.fmt).static_at_input
                or (get_format(q.fmt).scale.supports_per_tensor_scale and self.per_tensor_scale == "amax")
            )
        ]
        if not needs or self.calibration is None:
            return
        observed: dict[int, torch.Tensor] = {}

        def observe(quantizer: _Quantizer):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                v = quantizer.rotation.rotate(x) if quantizer.rotation is not None else x
                top = v.float().abs().amax()
                observed[id(quantizer)] = torch.maximum(observed.get(id(quantizer), top), top)

            return hook

        handles = [q.module().register_forward_pre_hook(observe(q)) for q in needs]
        device = next(self.model.parameters()).device
        try:
            with torch.no_grad():
                self._calibrating = True  # this injector's input hooks pass inputs through
                for ids in self.calibration:
                    self.model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1))
        finally:
            self._calibrating = False
            for h in handles:
                h.remove()
        for q in needs:
            q.calibrated_amax = observed.get(id(q))

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        """Remove this injector's hooks and parametrizations only (an enclosing injector's stay)."""
        for handle in self._hooks:
            handle.remove()
        for module, forward in reversed(self._forwards):
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward  # an enclosing injector's
        for module, param, parametrization in self._parametrized:
            chain = module.parametrizations[param]
            if len(chain) == 1:
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)
            else:
                del chain[next(i for i, p in enumerate(chain) if p is parametrization)]
        for module in self._touched:
            stack = _ACTIVE.get(module, [])
            if self in stack:
                stack.remove(self)
        self._hooks, self._parametrized, self._touched, self._forwards = [], [], [], []
        self._input_quantizers, self._expert_inputs, self.item_keys = [], set(), None


def _experts_input_forward(module: nn.Module, quantizers: dict[str, _Quantizer]):
    """The fused experts' computation with the inputs of the selected projections quantized
    (``harness.modelview.experts_forward``); the others' inputs pass unchanged."""

    def quantize_input(param: str, x: torch.Tensor) -> torch.Tensor:
        q = quantizers.get(param)
        return q(x, "input") if q is not None and q.active else x

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, quantize_input)

    return forward


def _input_hook(quantizer: _Quantizer):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not quantizer.active or quantizer.injector._calibrating:
            return None
        return (quantizer(args[0], "input"), *args[1:])

    return hook


def resolve_sides(
    fmt: str | None,
    point: str,
    weight: str | None,
    input: str | None,
    recipe: str | None,
    per_tensor_scale: str | None,
) -> tuple[str, str, str | None, str | None, str | None]:
    """``(fmt, point, weight format, input format, per_tensor_scale)`` from one of the three
    ways of naming the formats: ``fmt`` at ``point``, ``weight=``/``input=``, or ``recipe=``."""
    given = [what for what, v in (("fmt", fmt), ("weight/input", weight or input), ("recipe", recipe)) if v]
    if len(given) != 1:
        raise ValueError(
            "name the formats one way: QuantInjector(model, fmt, point), weight=/input= formats, or recipe= "
            f"(got {' and '.join(given) or 'none of them'})"
        )
    if recipe is not None:
        r = get_recipe(recipe)
        weight, input = r.weight, r.input
        if per_tensor_scale is None and r.per_tensor_scale:
            per_tensor_scale = "amax"
    elif fmt is not None:
        weight = fmt if point in ("weight", "both") else None
        input = fmt if point in ("input", "both") else None
    check_formats(weight, input)
    if per_tensor_scale not in (None, "amax"):
        raise ValueError(f"unknown per_tensor_scale {per_tensor_scale!r}; valid: 'amax' (per weight) or None")
    if per_tensor_scale and not any(f and get_format(f).scale.supports_per_tensor_scale for f in (weight, input)):
        raise ValueError(f"per_tensor_scale='amax' is NVFP4's second level; neither {weight!r} nor {input!r} has one")
    point = "both" if weight and input else ("weight" if weight else "input")
    return weight or input, point, weight, input, per_tensor_scale


def _mix(*parts: int | str | bytes) -> int:
    """A 62-bit key from ``parts`` (blake2b): distinct items, layers and seeds, distinct keys."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little") >> 2


def _item_keys(injector: QuantInjector, seed: int):
    """Model pre-hook: one key per batch row from the row's ``input_ids`` under its attention mask
    (``None`` when the model is called without ``input_ids``: then rows are keyed by content)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None or ids.dim() != 2:
            injector.item_keys = None
            return
        mask = kwargs.get("attention_mask")
        rows = []
        for b in range(ids.shape[0]):
            row = ids[b] if mask is None else ids[b][mask[b].bool()]
            rows.append(_mix(seed, row.cpu().numpy().tobytes()))
        injector.item_keys = rows

    return hook


def _keyed_rows(x: torch.Tensor, fmt: str, kw: dict, keys: list[int], name: str) -> torch.Tensor:
    """Stochastic rounding of each batch row of ``x`` (batch, tokens, hidden) under its own
    Philox key (the item's key and the module's name), so element (token t, feature h) of an item
    draws the same noise whatever the batch around it: the counter runs over the row only and
    right padding only appends tokens."""
    if x.shape[0] != len(keys):  # not the model's batch layout: key each row by its content
        keys = [_mix(x[b].detach().float().cpu().numpy().tobytes()) for b in range(x.shape[0])]
    rows = [
        fake_quantize(x[b], fmt, generator=torch.Generator().manual_seed(_mix(keys[b], name)), **kw)
        for b in range(x.shape[0])
    ]
    return torch.stack(rows)
