"""Applying a format to a model's Linear layers inside a context that always undoes itself
(design §4): weights (W4A16), inputs (W16A4) or both, per module, with mixed-precision overrides."""

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
from harness.recipes import check_formats, get_recipe
from harness.transforms import BlockRotation, check_transform

POINTS = ("weight", "input", "both")

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
    """One Linear the injector touched: its name, weight shape, format (the weight's, or the
    input's at point ``input``) and point."""

    name: str
    shape: tuple[int, ...]
    format: str
    point: str
    input_format: str | None = None  # the input's format when it differs from the weight's (recipes)


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

    def _quantize(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        injector = self.injector
        fmt = get_format(self.fmt)
        v = self.rotation.rotate(x) if self.rotation is not None else x
        kw: dict = {"axis": -1, "scale_mode": injector.scale_mode}
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

    def __call__(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        q = self._quantize(x.detach(), kind)
        if self.injector.observer is not None:
            self.injector.observer(self.name, kind, x.detach(), q, self.fmt)
        if self.injector.straight_through and torch.is_grad_enabled() and x.requires_grad:
            return StraightThrough.apply(x, q)
        return q


class _WeightParametrization(nn.Module):
    """``weight -> fake_quantize(weight)`` along the input dim.  The quantized copy is computed
    once per version of the weight (an optimizer step bumps it) and reused on every forward."""

    def __init__(self, quantizer: _Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer
        self._key: tuple[int, int] | None = None
        self._cached: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        injector = self.quantizer.injector
        if not self.quantizer.active:
            return weight
        if injector.straight_through and torch.is_grad_enabled() and weight.requires_grad:
            return self.quantizer(weight, "weight")
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            self._cached, self._key = self.quantizer(weight, "weight"), key
        return self._cached


class QuantInjector:
    """Context manager applying format ``fmt`` to a model's Linear layers.

    ``point``: ``weight`` quantizes each target's weight along its input dim (W4A16, QeRL style);
    ``input`` quantizes each target's input activation along the hidden dim, per token, in a
    forward pre-hook (W16A4); ``both``.  ``targets``: module-name globs or classes (default: every
    ``nn.Linear`` except the output embedding ``lm_head``, which is quantized only when named);
    ``exclude``: globs to leave alone; ``overrides``: ``{glob: format or None}`` for mixed precision
    (first matching glob wins; None keeps the module in its original precision).
    ``straight_through=True`` lets gradients reach the unquantized weights and inputs (training).
    ``seed`` drives stochastic formats through one CPU generator that keys their Philox stream, so
    a seed quantizes alike on every device (or pass one ``generator``).  ``scale_mode``: the
    E8M0 shared-exponent rule of every format used (``harness.formats.SCALE_MODES``).
    ``observer(name, kind, x, q, fmt)``, if given, sees every tensor quantized (``kind`` is
    ``"weight"`` or ``"input"``): the SRDD scanner measures exactly what the model quantizes.

    Weights are never edited: the Linear's weight Parameter is wrapped by a parametrization and
    the very same Parameter object is put back on exit, also when the body raises, and every hook
    is removed.  A tied ``lm_head`` (sharing its weight with the input embedding) is quantized
    where it is used as ``lm_head`` only; the embedding lookup keeps the original values, and
    ``notes`` says so.  ``modules`` lists what was touched (reset on every ``with``: one object
    can be entered again after it exits).

    Nesting: an injector entered inside another one wins on the modules both touch (the inner
    format replaces the outer one, it is not applied on top of it); when the inner one exits the
    outer one quantizes those modules again.  A model without any ``nn.Linear`` is a ValueError.

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
    ) -> None:
        if generator is not None and seed is not None:
            raise ValueError("pass a generator or a seed, not both")
        if point not in POINTS:
            raise ValueError(f"unknown injection point {point!r}; valid points: {', '.join(POINTS)}")
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
        self.scale_mode = scale_mode
        self.modules: list[InjectedModule] = []
        self.notes: list[str] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._parametrized: list[tuple[nn.Module, _WeightParametrization]] = []
        self._touched: list[nn.Module] = []
        self._input_quantizers: list[_Quantizer] = []
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

    def select(self) -> list[tuple[str, nn.Linear, str]]:
        """``(name, module, format)`` of every Linear this injector quantizes (nothing applied)."""
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"{type(self.model).__name__} has no nn.Linear module: QuantInjector quantizes the weights "
                "or inputs of nn.Linear layers only"
            )
        if self.targets is None:
            chosen = [(n, m) for n, m in linears if m is not output]
        else:
            globs = [t for t in self.targets if isinstance(t, str)]
            classes = tuple(t for t in self.targets if isinstance(t, type))
            chosen = [
                (n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, g) for g in globs) or isinstance(m, classes)
            ]
            for g in globs:
                if not any(fnmatch.fnmatchcase(n, g) for n, _ in linears):
                    examples = ", ".join(n for n, _ in linears[:3])
                    raise ValueError(
                        f"target {g!r} matches no nn.Linear in the model (names look like: {examples}, ...)"
                    )
        selected = []
        for name, module in chosen:
            if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
                continue
            fmt = next((f for g, f in self.overrides.items() if fnmatch.fnmatchcase(name, g)), self.fmt)
            if fmt is not None:
                selected.append((name, module, fmt))
        return selected

    def __enter__(self) -> QuantInjector:
        if self._touched:
            raise RuntimeError("this QuantInjector is already active; it is not re-entrant")
        self.modules, self.notes = [], []
        try:
            embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            for name, module, fmt in self.select():
                wfmt, ifmt = self._sides(fmt)
                rotation = self._rotation(name, module, wfmt or ifmt)
                quantizer = _Quantizer(self, wfmt or fmt, name, module, rotation, unrotate=ifmt is None)
                input_quantizer = _Quantizer(self, ifmt or fmt, name, module, rotation, unrotate=wfmt is None)
                _ACTIVE.setdefault(module, []).append(self)
                self._touched.append(module)
                if self.point in ("weight", "both"):
                    if embedding is not None and module.weight is getattr(embedding, "weight", None):
                        self.notes.append(
                            f"{name}.weight is tied to the input embedding: {name} uses {fmt} weights, "
                            "the embedding lookup keeps the original weights"
                        )
                    parametrization = _WeightParametrization(quantizer)
                    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
                    self._parametrized.append((module, parametrization))
                if self.point in ("input", "both"):
                    self._hooks.append(module.register_forward_pre_hook(_input_hook(input_quantizer)))
                    self._input_quantizers.append(input_quantizer)
                self.modules.append(
                    InjectedModule(
                        name, tuple(module.weight.shape), wfmt or ifmt, self.point, input_format=ifmt if wfmt else None
                    )
                )
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

    def _rotation(self, name: str, module: nn.Module, fmt: str) -> BlockRotation | None:
        if self.transform is None:
            return None
        f = get_format(fmt)
        size = self.transform_size or (f.block_shape[-1] if f.block_shape else 32)
        rotation = BlockRotation(size, self.transform_seed)
        rotation.check(module.weight.shape[-1], name)
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
            if get_format(q.fmt).static_at_input
            or (get_format(q.fmt).scale.supports_per_tensor_scale and self.per_tensor_scale == "amax")
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
        for module, parametrization in self._parametrized:
            chain = module.parametrizations["weight"]
            if len(chain) == 1:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            else:
                del chain[next(i for i, p in enumerate(chain) if p is parametrization)]
        for module in self._touched:
            stack = _ACTIVE.get(module, [])
            if self in stack:
                stack.remove(self)
        self._hooks, self._parametrized, self._touched = [], [], []
        self._input_quantizers, self.item_keys = [], None


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
