"""Gaussian noise on RMSNorm and/or Linear weights (QeRL's AQN), inside a context that always
takes it off again."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harness.modelview import ModelView, WeightKind
from harness.rng import DeviceGenerators
from harness.vocab import UnknownName, Vocab


class LayerType(Vocab, kind="layer type"):
    """Which weights :class:`NoiseInjector` perturbs (``layer_types``: one or both)."""

    RMSNORM = "rmsnorm"  # the norms' weights (QeRL; the LayerNorms of OPT and GPT-2)
    LINEAR = "linear"  # Linear, Conv1D and fused expert weights (not the MoE router)


class NoiseScale(Vocab, kind="noise scale"):
    """What sigma is measured in."""

    ABSOLUTE = "absolute"  # sigma itself (QeRL)
    RELATIVE = "relative"  # sigma times the RMS of what the weight does (a norm's effective gain)


LAYER_TYPES = LayerType.choices()
SCALES = NoiseScale.choices()
MOE_DEFAULT_TARGET = "*post_attention_layernorm"
NOISED_WEIGHTS = (WeightKind.LINEAR, WeightKind.CONV1D, WeightKind.EXPERTS)  # "linear": not the router


@dataclass(frozen=True)
class NoiseTarget:
    name: str
    kind: str
    numel: int
    offset: float = 0.0  # the norm's gain is offset + w (1 for Gemma's 1 + w norms)


class NoiseInjector:
    """``with NoiseInjector(model, ...) as noise: with noise.noisy(sigma): <forward/backward>``.

    ``noisy(sigma)`` sets each target weight to ``w_clean + N(0, sigma**2)`` (noise drawn in fp32
    from the seeded generator, cast to the weight dtype) and puts the clean values back when it
    ends, also on error, so noise never accumulates and an optimizer step after it updates the
    clean weights.  ``scale="relative"`` multiplies sigma by the RMS of what the weight does: a
    Linear's weight, a norm's effective gain (``w``, or ``1 + w`` for Gemma's norms, whose ``w``
    is near 0).  Targets come from the model view (``harness.modelview``): ``layer_types``
    ``rmsnorm`` (QeRL: the norms' weights; the LayerNorms of OPT and GPT-2), ``linear`` (Linear,
    Conv1D and fused expert weights; not the MoE router) or both; ``include``/``exclude``: name
    globs; MoE models get only ``post_attention_layernorm`` unless ``include`` says otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_types: Sequence[str] = ("rmsnorm",),
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = ("lm_head", "*embed*"),
        scale: str = "absolute",
        seed: int = 0,
    ) -> None:
        if not layer_types:
            raise UnknownName("layer type", [], LayerType.choices())
        layer_types = [LayerType.parse(t) for t in layer_types]
        scale = NoiseScale.parse(scale)
        self.view = ModelView(model)
        if include is None and self.view.is_moe:
            include = [MOE_DEFAULT_TARGET]
        self.model, self.layer_types, self.scale = model, tuple(layer_types), scale
        self.include, self.exclude = (list(include) if include is not None else None), tuple(exclude)
        self.generators = DeviceGenerators(seed)
        self.targets: list[NoiseTarget] = []
        self._params: list[nn.Parameter] = []
        self._offsets: list[float] = []

    def _candidates(self) -> list[tuple[str, str, nn.Parameter, float]]:
        """``(name, kind, Parameter, gain offset)`` of every weight of the chosen layer types."""
        out = []
        if "rmsnorm" in self.layer_types:
            out += [(n.name, "rmsnorm", n.module.weight, n.gain.offset()) for n in self.view.norms()]
        if "linear" in self.layer_types:
            out += [(w.name, "linear", w.parameter(), 0.0) for w in self.view.weights() if w.kind in NOISED_WEIGHTS]
        return out

    def _wanted(self, name: str) -> bool:
        if self.include is not None and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)

    def __enter__(self) -> NoiseInjector:
        seen: set[int] = set()
        self.targets, self._params, self._offsets = [], [], []  # one object can be entered again
        for name, kind, param, offset in self._candidates():
            if self._wanted(name) and id(param) not in seen:
                seen.add(id(param))
                self._params.append(param)
                self._offsets.append(offset)
                self.targets.append(NoiseTarget(name, kind, param.numel(), offset))
        if not self.targets:
            raise ValueError(
                f"no {'/'.join(self.layer_types)} weight matches include={self.include} exclude={list(self.exclude)}"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._params = []

    @property
    def touched(self) -> int:
        """How many weight tensors receive noise."""
        return len(self.targets)

    @contextlib.contextmanager
    def noisy(self, sigma: float) -> Iterator[None]:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        clean = [p.detach().clone() for p in self._params] if sigma > 0 else []
        try:
            with torch.no_grad():
                for p, c, offset in zip(self._params, clean, self._offsets):
                    noise = torch.randn(p.shape, generator=self.generators(p.device), device=p.device)
                    if self.scale == "relative":
                        noise *= (c.float() + offset).pow(2).mean().sqrt()
                    p.copy_((c.float() + sigma * noise).to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self._params, clean):
                    p.copy_(c)
