"""Applying a format to a model's Linear layers inside a context that always undoes itself
(design §4): weights (W4A16), inputs (W16A4) or both, per module, with mixed-precision overrides."""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from harness.formats import fake_quantize, get_format

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
    """One Linear the injector touched: its name, weight shape, format and point."""

    name: str
    shape: tuple[int, ...]
    format: str
    point: str


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
    """Fake-quantizes one module's weight or input and shows it to the injector's observer."""

    def __init__(self, injector: QuantInjector, fmt: str, name: str, module: nn.Module) -> None:
        self.injector = injector
        self.fmt = fmt
        self.name = name
        self.module = weakref.ref(module)

    @property
    def active(self) -> bool:
        """On for this module, and this injector is the innermost one active on it."""
        stack = _ACTIVE.get(self.module(), [])
        return bool(stack) and stack[-1] is self.injector and self.injector.active_for(self.name)

    def __call__(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        injector = self.injector
        q = fake_quantize(x.detach(), self.fmt, axis=-1, generator=injector.generator, scale_mode=injector.scale_mode)
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
    """

    def __init__(
        self,
        model: nn.Module,
        fmt: str,
        point: str = "weight",
        *,
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
        for f in (fmt, *(overrides or {}).values()):
            if f is None:
                continue
            get_format(f).with_scale_mode(scale_mode)
            if not causal_at(f, point):
                raise ValueError(
                    f"format {f!r} cannot quantize activations (point {point!r}): its "
                    f"{'x'.join(map(str, get_format(f).block_shape))} tiles of a (tokens x hidden) input would mix "
                    "tokens, so a token's output would depend on later tokens and on its batch (non-causal); "
                    "use it at point 'weight', or a 1-D block format for activations"
                )
        self.model, self.fmt, self.point = model, fmt, point
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
                quantizer = _Quantizer(self, fmt, name, module)
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
                    self._hooks.append(module.register_forward_pre_hook(_input_hook(quantizer)))
                self.modules.append(InjectedModule(name, tuple(module.weight.shape), fmt, self.point))
        except BaseException:
            self._restore()
            raise
        return self

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


def _input_hook(quantizer: _Quantizer):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not quantizer.active:
            return None
        return (quantizer(args[0], "input"), *args[1:])

    return hook
