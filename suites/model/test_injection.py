"""QuantInjector: W4A16 equals offline quantization bit for bit, W16A4 quantizes exactly the
Linear inputs, counts, overrides, the tied lm_head, straight-through gradients, and a model that
comes back bit-identical with no hook left, also after an exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.formats import fake_quantize
from harness.inject import QuantInjector
from harness.models import load_model
from harness.testing import format_params

TINY = [pytest.param("tiny-llama", id="tiny-llama"), pytest.param("tiny-qwen2", id="tiny-qwen2")]
DETERMINISTIC = format_params(where=lambda f: not f.stochastic)


def batch(tok) -> torch.Tensor:
    return tok(["Question: 2 + 3?\nAnswer: 5", "Question: seven?\nAnswer: 7!!"], return_tensors="pt", padding=True)


def snapshot(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}


def assert_restored(model: nn.Module, snap: dict) -> None:
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == snap.keys()
    for name, (param, values) in snap.items():
        assert now[name] is param, f"{name}: a different Parameter object after the injector"
        assert torch.equal(now[name], values), f"{name}: values changed"
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, f"{name}: hook left behind"
        assert not hasattr(module, "parametrizations"), f"{name}: parametrization left behind"


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("spec", TINY)
def test_w4a16_equals_a_model_quantized_offline(spec: str, name: str) -> None:
    model, tok = load_model(spec)
    offline, _ = load_model(spec)
    with torch.no_grad():
        for mod_name, module in offline.named_modules():
            if isinstance(module, nn.Linear) and mod_name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, name))
    inputs = batch(tok)
    with QuantInjector(model, name, "weight"), torch.no_grad():
        got = model(**inputs).logits
    assert torch.equal(got, offline(**inputs).logits)


@pytest.mark.parametrize("name", format_params(["mxfp4", "nvfp4", "mxfp8_e4m3"]))
def test_w16a4_quantizes_exactly_the_linear_inputs(name: str) -> None:
    model, tok = load_model("tiny-llama")
    seen_raw: dict[str, torch.Tensor] = {}
    seen_used: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    raw_hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen_raw.__setitem__(n, a[0])) for n, m in linears.items()
    ]
    try:
        with QuantInjector(model, name, "input") as injector, torch.no_grad():
            used_hooks = [
                m.register_forward_pre_hook(lambda m, a, n=n: seen_used.__setitem__(n, a[0]))
                for n, m in linears.items()
            ]
            model(**batch(tok))
            for h in used_hooks:
                h.remove()
    finally:
        for h in raw_hooks:
            h.remove()
    assert len(injector.modules) == len(linears) == len(seen_used)
    for n in linears:
        assert torch.equal(seen_used[n], fake_quantize(seen_raw[n], name)), n
        assert not torch.equal(seen_used[n], seen_raw[n])


@pytest.mark.mxfp4
def test_counts_on_the_model_under_test(model_under_test) -> None:
    """SmolLM2-135M: 30 decoder layers x 7 Linears = 210 by default, 211 with lm_head named."""
    model = model_under_test.model
    decoder_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with QuantInjector(model, "mxfp4") as injector:
        assert len(injector.modules) == len(decoder_linears)
        assert {m.format for m in injector.modules} == {"mxfp4"}
    with QuantInjector(model, "mxfp4", targets=["model.layers.*", "lm_head"]) as injector:
        assert len(injector.modules) == len(decoder_linears) + 1
    if model.config.model_type == "llama" and model.config.num_hidden_layers == 30:
        assert len(decoder_linears) == 210


@pytest.mark.parametrize("point", ["weight", "input", "both"])
@pytest.mark.mxfp4
def test_everything_restored_after_an_exception_in_forward(point: str) -> None:
    model, tok = load_model("tiny-llama")
    snap = snapshot(model)
    calls = []

    def boom(module, args):
        calls.append(1)
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        with QuantInjector(model, "mxfp4", point, targets=["*", "lm_head"]):
            model.model.layers[1].mlp.down_proj.register_forward_pre_hook(boom)
            model(**batch(tok))
    assert calls
    model.model.layers[1].mlp.down_proj._forward_pre_hooks.clear()  # the test's own hook
    assert_restored(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.mxfp4
def test_overrides_keep_named_modules_untouched() -> None:
    model, _ = load_model("tiny-llama")
    originals = {n: m.weight for n, m in model.named_modules() if n.endswith("down_proj")}
    with QuantInjector(model, "mxfp4", overrides={"*.down_proj": None, "*.q_proj": "mxfp8_e4m3"}) as injector:
        for n, w in originals.items():
            assert dict(model.named_modules())[n].weight is w
        formats = {m.name.rsplit(".", 1)[-1]: m.format for m in injector.modules}
    assert "down_proj" not in formats and formats["q_proj"] == "mxfp8_e4m3" and formats["up_proj"] == "mxfp4"


@pytest.mark.mxfp4
def test_tied_lm_head_is_quantized_only_as_lm_head() -> None:
    model, _ = load_model("tiny-llama")
    emb = model.model.embed_tokens.weight
    with QuantInjector(model, "mxfp4", targets=["lm_head"]) as injector:
        assert torch.equal(model.lm_head.weight, fake_quantize(emb, "mxfp4"))
        assert model.model.embed_tokens.weight is emb
        assert any("tied to the input embedding" in note for note in injector.notes)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.mxfp4
def test_straight_through_gradients_reach_the_original_weights() -> None:
    """With straight_through=True the gradient w.r.t. each original weight equals the gradient
    w.r.t. the quantized weight of an offline-quantized copy (identity backward of STE)."""
    model, tok = load_model("tiny-llama")
    offline, _ = load_model("tiny-llama")
    with torch.no_grad():
        for n, m in offline.named_modules():
            if isinstance(m, nn.Linear) and n != "lm_head":
                m.weight.copy_(fake_quantize(m.weight, "mxfp4"))
    inputs = batch(tok)
    with QuantInjector(model, "mxfp4", straight_through=True):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    offline(**inputs, labels=inputs["input_ids"]).loss.backward()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.grad is not None and torch.allclose(q.grad, offline.model.layers[0].self_attn.q_proj.weight.grad)


def test_bad_arguments_name_the_valid_choices() -> None:
    model, _ = load_model("tiny-llama")
    with pytest.raises(
        ValueError, match=r"unknown injection point 'weights'; valid injection points: weight, input, both"
    ):
        QuantInjector(model, "mxfp4", "weights")
    with pytest.raises(ValueError, match=r"unknown format 'fp4'"):
        QuantInjector(model, "fp4")
    with pytest.raises(ValueError, match=r"target .decoder.\*. matches no quantizable weight"):
        with QuantInjector(model, "mxfp4", targets=["decoder.*"]):
            pass


@pytest.mark.mxfp4_sr
def test_a_seed_quantizes_stochastically_alike_on_every_device(device: torch.device) -> None:
    """``seed=`` keys the Philox stream with a CPU generator, which drives tensors on any device
    (the 2026-11-26 GPU run failed with a CPU generator on CUDA tensors): the weights quantized on
    ``device`` equal, bit for bit, those quantized on the CPU with the same seed; a seed with a
    generator is refused."""
    model, _ = load_model("tiny-llama", device=str(device))
    cpu_model, _ = load_model("tiny-llama")
    name = "model.layers.0.mlp.down_proj"
    with QuantInjector(model, "mxfp4_sr", "weight", seed=3), QuantInjector(cpu_model, "mxfp4_sr", "weight", seed=3):
        here = model.get_submodule(name).weight.detach().cpu()
        on_cpu = cpu_model.get_submodule(name).weight.detach()
        assert torch.equal(here, on_cpu)
    with QuantInjector(cpu_model, "mxfp4_sr", "weight", seed=4):
        assert not torch.equal(cpu_model.get_submodule(name).weight.detach(), on_cpu)  # the seed matters
    with pytest.raises(ValueError, match="a generator or a seed, not both"):
        QuantInjector(model, "mxfp4_sr", generator=torch.Generator(device), seed=3)


@pytest.mark.mxfp4
def test_scale_mode_reaches_every_quantized_weight() -> None:
    model, tok = load_model("tiny-llama")
    offline, _ = load_model("tiny-llama")
    with torch.no_grad():
        for mod_name, module in offline.named_modules():
            if isinstance(module, nn.Linear) and mod_name != "lm_head":
                module.weight.copy_(fake_quantize(module.weight, "mxfp4", scale_mode="rceil"))
    inputs = batch(tok)
    with QuantInjector(model, "mxfp4", "weight", scale_mode="rceil"), torch.no_grad():
        got = model(**inputs).logits
    assert torch.equal(got, offline(**inputs).logits)
    with QuantInjector(model, "mxfp4", "weight"), torch.no_grad():
        assert not torch.equal(model(**inputs).logits, got)  # floor differs: the mode really arrived
    with pytest.raises(ValueError, match="unknown scale_mode 'up'"):
        QuantInjector(model, "mxfp4", scale_mode="up")
