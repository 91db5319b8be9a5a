"""One view of a causal LM's structure, per architecture family: the decoder layers, the body,
the modules between the last layer and the head, the head, the norms (and how each applies its
weight), and every weight a format can quantize.  Scans, attribution, injection and AQN read the
model through it; an architecture it does not know is refused, never guessed.

Quantizable weights, as transformers stores them (``transformers.pytorch_utils.Conv1D``; the
fused ``*Experts`` modules of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE):

- ``linear``: ``nn.Linear``, weight (out, in); quantized along dim -1, the input dim;
- ``conv1d``: GPT-2's ``Conv1D``, weight (in, out) (``y = x @ W + b``); quantized along dim 0,
  which is its input dim;
- ``experts``: fused expert tensors (experts, out, in) (``gate_up_proj`` holds gate then up along
  out, ``down_proj``); quantized per expert along dim -1, the input dim;
- ``router``: the MoE router's (experts, in) weight; kept in high precision unless named, as
  deployments do (vLLM and ModelOpt leave ``mlp.gate`` unquantized).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


class WeightKind(str, enum.Enum):
    """How a quantizable weight is stored (module docstring)."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EXPERTS = "experts"
    ROUTER = "router"


class NormGain(str, enum.Enum):
    """How a norm applies its weight ``w``: ``x̂ · w`` (Llama, OPT, GPT-2) or ``x̂ · (1 + w)``
    (Gemma, ``Gemma2RMSNorm``)."""

    W = "w"
    ONE_PLUS_W = "1+w"

    def offset(self) -> float:
        return 1.0 if self is NormGain.ONE_PLUS_W else 0.0


@dataclass(frozen=True)
class Family:
    """What the view knows of one architecture family (paths are module names in the model)."""

    model_type: str
    classes: tuple[str, ...]  # the model classes of this family the view accepts
    body: str  # the decoder stack (embeddings, layers, final norm) without the head
    layers: str  # its ModuleList of decoder layers
    finish: tuple[str, ...]  # applied in order between the last layer and the head
    head: str = "lm_head"
    norm_gain: NormGain = NormGain.W
    norm_types: tuple[str, ...] = ()  # class names of the norms
    experts: str | None = None  # path of the fused experts inside a layer
    router: str | None = None  # path of the router inside a layer
    logit_softcap: str | None = None  # config key of a tanh cap on the logits (Gemma2)


def _llama_like(model_type: str, prefix: str, **kw) -> Family:
    return Family(
        model_type,
        (f"{prefix}ForCausalLM",),
        body="model",
        layers="model.layers",
        finish=("model.norm",),
        norm_types=(f"{prefix}RMSNorm",),
        **kw,
    )


_MOE = dict(experts="mlp.experts", router="mlp.gate")
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _llama_like("llama", "Llama"),
        _llama_like("qwen2", "Qwen2"),
        _llama_like("qwen3", "Qwen3"),
        _llama_like("mistral", "Mistral"),
        _llama_like("phi3", "Phi3"),
        _llama_like("gemma2", "Gemma2", norm_gain=NormGain.ONE_PLUS_W, logit_softcap="final_logit_softcapping"),
        _llama_like("mixtral", "Mixtral", **_MOE),
        _llama_like("qwen2_moe", "Qwen2Moe", **_MOE),
        _llama_like("qwen3_moe", "Qwen3Moe", **_MOE),
        _llama_like("olmoe", "Olmoe", **_MOE),
        Family(
            "opt",
            ("OPTForCausalLM",),
            body="model.decoder",
            layers="model.decoder.layers",
            finish=("model.decoder.final_layer_norm", "model.decoder.project_out"),
            norm_types=("LayerNorm",),
        ),
        Family(
            "gpt2",
            ("GPT2LMHeadModel",),
            body="transformer",
            layers="transformer.h",
            finish=("transformer.ln_f",),
            norm_types=("LayerNorm",),
        ),
    )
}


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One quantizable weight: ``getattr(module, param)``, quantized along ``axis`` (its input dim).
    ``name`` is the module's name for Linear/Conv1D/router, ``<experts module>.<param>`` for experts."""

    name: str
    module: nn.Module
    param: str
    kind: WeightKind
    layer: str | None  # the decoder layer holding it; None for the head

    @property
    def axis(self) -> int:
        return 0 if self.kind is WeightKind.CONV1D else -1

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    def parameter(self) -> nn.Parameter:
        """The Parameter itself, also under a parametrization (a QuantInjector's)."""
        from torch.nn.utils.parametrize import is_parametrized

        if is_parametrized(self.module, self.param):
            return self.module.parametrizations[self.param].original
        return getattr(self.module, self.param)

    def matrix(self) -> torch.Tensor:
        """As (out, in) — per expert (experts, out, in) — whatever the storage."""
        w = self.tensor
        return w.t() if self.kind is WeightKind.CONV1D else w


@dataclass(frozen=True)
class Norm:
    name: str
    module: nn.Module
    gain: NormGain

    def effective_gain(self) -> torch.Tensor:
        """The factor the norm multiplies the normalised input by: ``w`` or ``1 + w`` (fp32)."""
        return self.module.weight.detach().float() + self.gain.offset()


def _module_types(model: nn.Module) -> str:
    names = sorted({type(m).__name__ for m in model.modules()})
    return ", ".join(names[:12]) + (f", ... ({len(names)} types)" if len(names) > 12 else "")


class ModelView:
    """The structure of ``model`` (a transformers causal LM of a family in :data:`FAMILIES`).

    ``ModelView(model)`` raises ValueError naming the model's class, ``model_type`` and module
    types when the family is unknown or its modules are not where the family puts them."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        cls = type(model).__name__
        family = FAMILIES.get(model_type)
        if family is None or cls not in family.classes:
            known = ", ".join(f"{f.model_type} ({'/'.join(f.classes)})" for f in FAMILIES.values())
            raise ValueError(
                f"architecture {cls} (model_type {model_type!r}) is not one the harness knows, so it cannot say which "
                f"weights to quantize; its modules: {_module_types(model)}. Known: {known}. "
                "To add one: docs/models.md, 'Adding an architecture'"
            )
        self.model, self.family = model, family
        modules = dict(model.named_modules())
        missing = [p for p in (family.body, family.layers, family.head, family.finish[0]) if p not in modules]
        if missing or not isinstance(modules.get(family.layers), nn.ModuleList):
            raise ValueError(
                f"{cls} (model_type {model_type!r}) has no {', '.join(missing) or family.layers + ' ModuleList'} where "
                f"the {model_type} family keeps it; its modules: {_module_types(model)}"
            )
        self._modules = modules

    # structure ---------------------------------------------------------------------------------
    @cached_property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The decoder layers, in order: ``(name, module)``."""
        return [(f"{self.family.layers}.{i}", m) for i, m in enumerate(self._modules[self.family.layers])]

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def body(self) -> nn.Module:
        """The decoder stack without the head: called like the model, returns ``last_hidden_state``."""
        return self._modules[self.family.body]

    @property
    def head(self) -> nn.Module:
        return self._modules[self.family.head]

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output as the body returns it (final norm, OPT's ``project_out``)."""
        for path in self.family.finish:
            module = self._modules.get(path)
            if module is not None:
                hidden = module(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on the body's output, with Gemma2's ``cap · tanh(logits / cap)`` when configured."""
        logits = self.head(hidden)
        cap = getattr(self.model.config, self.family.logit_softcap, None) if self.family.logit_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits

    def head_logprobs(self, hidden: torch.Tensor, lengths) -> list[torch.Tensor]:
        """Per item ``i`` with ``(length, start)``: log-probs at the positions predicting its answer
        tokens ``start … length-1``, from the body's output (the head applied to those positions only)."""
        return [
            F.log_softmax(self.logits(hidden[i, start - 1 : length - 1]).float(), dim=-1)
            for i, (length, start) in enumerate(lengths)
        ]

    def layer_of(self, name: str) -> str | None:
        """The decoder layer a module or weight name lies in (None: outside every layer)."""
        return next((layer for layer in self.layer_names if name.startswith(layer + ".")), None)

    @property
    def is_moe(self) -> bool:
        return self.family.experts is not None

    def norms(self) -> list[Norm]:
        """Every norm with a weight (the body's and the layers'), in model order."""
        return [
            Norm(name, m, self.family.norm_gain)
            for name, m in self.model.named_modules()
            if type(m).__name__ in self.family.norm_types and isinstance(getattr(m, "weight", None), torch.Tensor)
        ]

    # quantizable weights -----------------------------------------------------------------------
    def weights(self) -> list[QuantWeight]:
        """Every quantizable weight of the decoder layers, then the head (module docstring)."""
        out = [w for name, layer in self.layers for w in self._layer_weights(name, layer)]
        return [*out, QuantWeight(self.family.head, self.head, "weight", WeightKind.LINEAR, None)]

    def _layer_weights(self, layer_name: str, layer: nn.Module) -> Iterator[QuantWeight]:
        from transformers.pytorch_utils import Conv1D

        fam = self.family
        for rel, module in layer.named_modules():
            name = f"{layer_name}.{rel}"
            if fam.router is not None and rel == fam.router:
                yield QuantWeight(name, module, "weight", WeightKind.ROUTER, layer_name)
            elif fam.experts is not None and rel == fam.experts:
                for param in EXPERT_PARAMS:
                    yield QuantWeight(f"{name}.{param}", module, param, WeightKind.EXPERTS, layer_name)
            elif isinstance(module, nn.Linear):
                yield QuantWeight(name, module, "weight", WeightKind.LINEAR, layer_name)
            elif isinstance(module, Conv1D):
                yield QuantWeight(name, module, "weight", WeightKind.CONV1D, layer_name)

    def unreachable(self) -> list[tuple[str, int]]:
        """``(name, numel)`` of every weight of the decoder layers with 2 or more dims that no
        :meth:`weights` entry covers: a module type the view cannot quantize."""
        covered = {id(w.parameter()) for w in self.weights()}
        out = []
        for layer_name, layer in self.layers:
            for rel, p in layer.named_parameters():
                if p.dim() >= 2 and id(p) not in covered:
                    out.append((f"{layer_name}.{rel}", p.numel()))
        return out

    def decoder_weight_numel(self) -> int:
        """Parameters in the decoder layers' weights of 2 or more dims (norms and biases excluded)."""
        seen: dict[int, int] = {}
        for _, layer in self.layers:
            for p in layer.parameters():
                if p.dim() >= 2:
                    seen[id(p)] = p.numel()
        return sum(seen.values())


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' fused expert tensors, (experts, out, in)


def experts_forward(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    quantize_input,
) -> torch.Tensor:
    """transformers' eager fused-experts computation (``MixtralExperts.forward``: per token and
    chosen expert e, ``down_e(act(gate_e x) · up_e x)`` weighted by the router) with
    ``quantize_input(param, x)`` applied to each projection's input, row by row (per token): to the
    (tokens, hidden) states every ``gate_up_proj`` reads, and to the (tokens, top_k, intermediate)
    inputs of the chosen experts' ``down_proj``."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    x = quantize_input("gate_up_proj", hidden)
    inner = hidden.new_zeros((*top_k_index.shape, down.shape[-1]))
    chosen = [e for e in torch.unique(top_k_index).tolist() if e < gate_up.shape[0]]
    for e in chosen:
        token, slot = torch.where(top_k_index == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        inner[token, slot] = (experts.act_fn(gate) * up).to(inner.dtype)
    inner = quantize_input("down_proj", inner)
    out = torch.zeros_like(hidden)
    for e in chosen:
        token, slot = torch.where(top_k_index == e)
        y = F.linear(inner[token, slot], down[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
