"""Gaussian noise on RMSNorm and/or Linear weights (QeRL's AQN), inside a context that always
takes it off again."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from harness.rng import DeviceGenerators

LAYER_TYPES = ("rmsnorm", "linear")
SCALES = ("absolute", "relative")
MOE_DEFAULT_TARGET = "*post_attention_layernorm"


def is_rmsnorm(module: nn.Module) -> bool:
    """By type or by class name, so runtimes' own classes count (LlamaRMSNorm, Qwen2RMSNorm, vLLM's RMSNorm)."""
    return isinstance(module, getattr(nn, "RMSNorm", ())) or "rmsnorm" in type(module).__name__.lower()


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a runtime's linear class (ColumnParallelLinear, ...), holding a 2-D weight."""
    weight = getattr(module, "weight", None)
    named_linear = type(module).__name__.endswith("Linear")
    return (isinstance(module, nn.Linear) or named_linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2


def is_moe(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    experts = any(getattr(config, k, 0) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    return bool(experts) or any(".experts." in name for name, _ in model.named_modules())


@dataclass(frozen=True)
class NoiseTarget:
    name: str
    kind: str
    numel: int


class NoiseInjector:
    """``with NoiseInjector(model, ...) as noise: with noise.noisy(sigma): <forward/backward>``.

    ``noisy(sigma)`` sets each target weight to ``w_clean + N(0, sigma**2)`` (noise drawn in fp32
    from the seeded generator, cast to the weight dtype; ``scale="relative"`` multiplies sigma by
    the weight's RMS) and puts the clean values back when it ends, also on error, so noise never
    accumulates and an optimizer step after it updates the clean weights.  ``layer_types``:
    ``rmsnorm`` (QeRL), ``linear`` or both; ``include``/``exclude``: module-name globs; MoE models
    get only ``post_attention_layernorm`` unless ``include`` says otherwise.
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
        bad = [t for t in layer_types if t not in LAYER_TYPES]
        if bad or not layer_types:
            raise ValueError(f"unknown layer_types {list(layer_types)}; valid: {', '.join(LAYER_TYPES)} (one or both)")
        if scale not in SCALES:
            raise ValueError(f"unknown noise scale {scale!r}; valid: {', '.join(SCALES)}")
        if include is None and is_moe(model):
            include = [MOE_DEFAULT_TARGET]
        self.model, self.layer_types, self.scale = model, tuple(layer_types), scale
        self.include, self.exclude = (list(include) if include is not None else None), tuple(exclude)
        self.generators = DeviceGenerators(seed)
        self.targets: list[NoiseTarget] = []
        self._params: list[nn.Parameter] = []

    def _wanted(self, name: str, module: nn.Module) -> str | None:
        kind = "rmsnorm" if is_rmsnorm(module) else "linear" if is_linear(module) else None
        if kind not in self.layer_types:
            return None
        if self.include is not None and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return None
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return None
        return kind

    def __enter__(self) -> NoiseInjector:
        seen: set[int] = set()
        self.targets, self._params = [], []  # one object can be entered again
        for name, module in self.model.named_modules():
            kind = self._wanted(name, module)
            if not kind:
                continue
            # the Parameter itself, also under a QuantInjector's parametrization
            param = module.parametrizations["weight"].original if is_parametrized(module, "weight") else module.weight
            if id(param) not in seen:
                seen.add(id(param))
                self._params.append(param)
                self.targets.append(NoiseTarget(name, kind, param.numel()))
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
                for p, c in zip(self._params, clean):
                    noise = torch.randn(p.shape, generator=self.generators(p.device), device=p.device)
                    if self.scale == "relative":
                        noise *= c.float().pow(2).mean().sqrt()
                    p.copy_((c.float() + sigma * noise).to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self._params, clean):
                    p.copy_(c)
