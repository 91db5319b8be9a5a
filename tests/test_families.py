"""Every architecture family the model view knows, each as a 2-layer random model from its stock
transformers config (``harness.models.TINY_FAMILIES``, nothing downloaded): injection reaches
100 % of the intended weights (counted against a direct enumeration of the parameters), restores
them bit-exactly, fused experts are quantized as a direct computation says, and ``eval loss``,
``scan`` at every point and ``aqn preflight`` run; a defect planted in one layer (one expert of
one layer for MoE) is found by the scan.  Unknown architectures, unreachable weights and globs
that match nothing are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import cli
from harness.aqn.configs import load_config
from harness.aqn.preflight import preflight
from harness.formats import fake_quantize, nvfp4_per_tensor_scale
from harness.gsm8k import Gsm8kItem
from harness.inject import QuantInjector
from harness.models import TINY_FAMILIES, load_model, model_identity, tiny_model
from harness.modelview import ModelView
from harness.srdd.run import scan_model
from harness.srdd.scan import record_layers

FAMILIES = list(TINY_FAMILIES)
MOE = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]
ITEMS = [Gsm8kItem(f"What is {i} plus {2 * i}?", f"{i} + {2 * i} = {3 * i}\n#### {3 * i}") for i in range(8)]
LAYER = re.compile(r"^(?:model\.layers|model\.decoder\.layers|transformer\.h)\.\d+\.")


def intended(model: nn.Module) -> dict[str, torch.Tensor]:
    """Direct enumeration, without the view: every parameter of 2 or more dims inside a decoder
    layer, except the MoE router (``mlp.gate.weight``), which deployments keep in high precision."""
    return {
        n: p
        for n, p in model.named_parameters()
        if LAYER.match(n) and p.dim() >= 2 and not n.endswith("mlp.gate.weight")
    }


def expected_quantized(name: str, w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """MXFP4 along the input dim, computed directly: Conv1D stores (in, out), experts are
    quantized one expert at a time."""
    if conv1d:
        return fake_quantize(w.t(), "mxfp4").t()
    if w.dim() == 3:
        return torch.stack([fake_quantize(w[e], "mxfp4") for e in range(len(w))])
    return fake_quantize(w, "mxfp4")


@pytest.mark.parametrize("family", FAMILIES)
def test_injection_covers_every_intended_weight_and_restores_it(family: str) -> None:
    model, tok = tiny_model(family)
    weights = intended(model)
    snapshot = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    conv1d = family == "tiny-gpt2"
    router = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    ids = torch.tensor([tok("Question: 1 + 1?")["input_ids"]])
    for point in ("weight", "input", "both"):
        with QuantInjector(model, "mxfp4", point) as injector:
            coverage = injector.coverage
            assert coverage.quantized == sum(p.numel() for p in weights.values()) > 0
            assert coverage.complete and coverage.requested_share == 1.0 and not coverage.unreachable
            assert coverage.decoder == coverage.quantized + router
            assert len(injector.modules) == len(weights)
            if point == "weight":
                for name in weights:
                    module_name, param = name.rsplit(".", 1)
                    now = getattr(model.get_submodule(module_name), param)
                    assert torch.equal(now, expected_quantized(name, snapshot[name][1], conv1d)), name
            model(ids)
        for name, (param, clean) in snapshot.items():
            now = dict(model.named_parameters())[name]
            assert now is param and torch.equal(now, clean), (point, name)


@pytest.mark.parametrize("family", MOE)
def test_fused_experts_match_a_direct_computation(family: str) -> None:
    """Weights and inputs of every projection of every chosen expert quantized (point ``both``):
    the experts' output equals Σ_k w_k · Q(W_down,e) · Q(act(Q(W_gate,e) Q(x)) ⊙ Q(W_up,e) Q(x))."""
    model, _ = tiny_model(family)
    experts = model.model.layers[1].mlp.experts
    g = torch.Generator().manual_seed(0)
    tokens, top_k = 6, 2
    hidden = torch.randn(tokens, model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    direct = torch.zeros_like(hidden)
    for t in range(tokens):
        x = fake_quantize(hidden[t], "mxfp4")
        for k in range(top_k):
            e = index[t, k]
            gate, up = (fake_quantize(gate_up[e], "mxfp4") @ x).chunk(2)
            h = fake_quantize(experts.act_fn(gate) * up, "mxfp4")
            direct[t] += weights[t, k] * (fake_quantize(down[e], "mxfp4") @ h)
    with torch.no_grad():
        reference = experts(hidden, index, weights)
        with QuantInjector(model, "mxfp4", "both"):
            quantized = experts(hidden, index, weights)
        with QuantInjector(model, "mxfp4", "weight"):  # transformers' own forward on quantized weights
            weight_only = experts(hidden, index, weights)
    assert torch.allclose(quantized, direct, atol=1e-5) and not torch.allclose(quantized, reference, atol=1e-3)
    w_direct = torch.zeros_like(hidden)
    for t in range(tokens):
        for k in range(top_k):
            e = index[t, k]
            gate, up = (fake_quantize(gate_up[e], "mxfp4") @ hidden[t]).chunk(2)
            w_direct[t] += weights[t, k] * (fake_quantize(down[e], "mxfp4") @ (experts.act_fn(gate) * up))
    assert torch.allclose(weight_only, w_direct, atol=1e-5)
    assert torch.equal(experts(hidden, index, weights), reference)  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_the_views_head_reproduces_the_models_logits(family: str) -> None:
    """Replaying the layers from the first one's recorded input, then ``finish`` and the head
    (Gemma2's logit cap included), gives the model's own log-probs: what attribution relies on."""
    model, tok = tiny_model(family)
    view = ModelView(model)
    ids = torch.tensor([tok("Question: 2 + 2?\nAnswer: 4")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        record = record_layers(model, ids, mask)
        h = record.inputs[view.layer_names[0]].hidden
        for name, layer in view.layers:
            h = record.inputs[name].run(layer, h)
        mine = view.head_logprobs(view.finish(h), [(ids.shape[1], 1)])[0]
        theirs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[0, :-1].float(), dim=-1)
    assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_loss_reports_full_coverage(family: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["eval", "loss", "--model", family, "--format", "mxfp4", "--items", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    coverage = doc["recipe"]["coverage"]
    assert coverage["complete"] and coverage["requested_share"] == 1.0
    assert coverage["quantized"] == sum(p.numel() for p in intended(tiny_model(family)[0]).values())
    assert doc["aggregate"]["kl"] > 0 and doc["recipe"]["dtype"] == "float32"


def test_gpt2_without_architectures_is_quantized(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A GPT-2 directory whose config.json lacks ``architectures`` (a conversion): its Conv1D
    projections are quantized, so the loss result is not 'KL 0'."""
    model, tok = tiny_model("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["eval", "loss", "--model", str(tmp_path), "--format", "mxfp4", "--items", "2"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("quantized 98,304 of 98,304 decoder weight parameters (100.0%")
    kl = float(re.search(r"^\S*mxfp4\s+\S+\s+(\S+)", out, re.M).group(1))
    assert kl > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_runs_at_every_point(family: str) -> None:
    model, tok = tiny_model(family)
    for point in ("weight", "input", "both"):
        doc = scan_model(
            model,
            tok,
            ITEMS[:2],
            "mxfp4",
            point,
            model_name=family,
            evaluation=ITEMS[:2] if point == "weight" else (),
            attribution="screen" if point == "weight" else "none",
            instability_runs=2 if point == "both" else 0,
            do_verify=False,
        )
        assert doc.coverage["complete"] and len(doc.layers) == 2
        assert all(m.layer is not None for m in doc.modules)
        if point == "weight":
            assert [a.layer for a in doc.attribution] == ["all", *ModelView(model).layer_names]


def plant(model: nn.Module, family: str) -> str:
    """±25 σ outliers, two per row, in every weight of layer 1 (MoE: in expert 2 of layer 1's
    fused experts only); returns the name the scan reports the defect under."""
    view = ModelView(model)
    g = torch.Generator().manual_seed(7)
    chosen = [w for w in view.weights() if w.layer == view.layer_names[1]]
    if family in MOE:
        chosen = [w for w in chosen if w.kind.value == "experts"]
    with torch.no_grad():
        for w in chosen:
            m = w.matrix()
            target = m[2] if m.dim() == 3 else m
            cols = torch.randint(0, target.shape[1], (target.shape[0], 2), generator=g)
            signs = torch.sign(torch.randn(target.shape[0], 2, generator=g))
            target.scatter_(1, cols, 25 * target.std() * signs)
    return chosen[0].name + ("[2]" if family in MOE else "")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_defect_is_found(family: str) -> None:
    model, tok = tiny_model(family)
    planted = plant(model, family)
    doc = scan_model(model, tok, ITEMS[:2], "mxfp4", "weight", model_name=family, instability_runs=0, gain=False)
    layer = ModelView(model).layer_names[1]
    assert doc.problematic_layers == [layer]
    tensors = {r.tensor for finding in doc.layers if finding.name == layer for r in finding.reasons}
    assert f"{planted}.weight" in tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_aqn_preflight_runs(family: str) -> None:
    model, tok = tiny_model(family)
    result = preflight(model, tok, ITEMS[:2], load_config("qerl-default"), draws=2)
    assert result.coverage["complete"] and result.targets > 0 and len(result.draws) == 2


def test_unknown_architectures_are_refused_naming_what_was_found(monkeypatch, capsys) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(
        ValueError,
        match=r"architecture GPTNeoXForCausalLM \(model_type 'gpt_neox'\) is not one .* "
        r"its modules: .*GPTNeoXLayer",
    ):
        QuantInjector(model, "mxfp4").select()
    _, tok = tiny_model("tiny-llama")
    monkeypatch.setattr(cli, "_load", lambda args: (model, tok))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "loss", "--format", "mxfp4", "--items", "2"])
    assert exit_.value.code == 2 and "GPTNeoXForCausalLM" in capsys.readouterr().err


class Bilinear(nn.Module):
    """A module type the view does not know, holding a decoder weight."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.ones(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_unreachable_weight_is_an_error_unless_accepted(monkeypatch, capsys) -> None:
    model, tok = tiny_model("tiny-llama")
    model.model.layers[1].extra = Bilinear()
    with pytest.raises(ValueError, match=r"cannot quantize 1 weight\(s\) .*: model\.layers\.1\.extra\.kernel"):
        QuantInjector(model, "mxfp4").select()
    with QuantInjector(model, "mxfp4", allow_partial=True) as injector:
        coverage = injector.coverage
    assert coverage.unreachable == ("model.layers.1.extra.kernel",) and coverage.requested - coverage.quantized == 64
    assert coverage.line().startswith("PARTIAL (accepted with --allow-partial)")
    with QuantInjector(model, "mxfp4", exclude=["*.extra.*"]) as injector:  # excluded: asked for nothing more
        assert injector.coverage.complete
    monkeypatch.setattr(cli, "_load", lambda args: (model, tok))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "loss", "--format", "mxfp4", "--items", "2"])
    assert exit_.value.code == 2 and "model.layers.1.extra.kernel" in capsys.readouterr().err
    assert cli.main(["eval", "loss", "--format", "mxfp4", "--items", "2", "--allow-partial"]) == 0
    assert capsys.readouterr().out.startswith("PARTIAL (accepted with --allow-partial): quantized 73,728 of 73,792")


@pytest.mark.parametrize(
    "option", [{"targets": ["*.q_prj"]}, {"exclude": ["*.q_prj"]}, {"overrides": {"*.q_prj": None}}]
)
def test_a_glob_that_matches_nothing_is_an_error(option: dict) -> None:
    model, _ = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match=r"'\*\.q_prj' matches no quantizable weight of LlamaForCausalLM"):
        QuantInjector(model, "mxfp4", **option).select()


def test_model_identity_covers_every_parameter() -> None:
    """Two models differing only in one middle tensor have different identities."""
    a, _ = tiny_model("tiny-llama")
    b, _ = tiny_model("tiny-llama")
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():  # a fine-tune of one middle tensor (not the first or last parameter)
        b.model.layers[0].mlp.up_proj.weight.add_(1e-4 * torch.randn_like(b.model.layers[0].mlp.up_proj.weight))
    assert model_identity(a)["weights_sha256"] != model_identity(b)["weights_sha256"]


def test_a_model_stored_in_bf16_loads_in_bf16_unless_dtype_is_given(tmp_path: Path) -> None:
    model, tok = tiny_model("tiny-qwen2")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    args = cli.build_parser().parse_args(["eval", "loss", "--model", str(tmp_path), "--format", "mxfp4"])
    assert next(cli._load(args)[0].parameters()).dtype == torch.bfloat16
    args.dtype = "float32"
    assert next(cli._load(args)[0].parameters()).dtype == torch.float32
    assert next(load_model(str(tmp_path))[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(str(tmp_path), dtype=torch.float32)[0].parameters()).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_e4m3_tensor", "int8_tensor"])
def test_per_tensor_scales_of_fused_experts_are_per_expert(fmt: str) -> None:
    """A deployment stores each expert as its own weight with its own per-tensor scale (NVFP4's
    fp32 second level ``amax/(448*6)``, FP8/INT8 ``amax/448``, ``amax/127.5``): expert ``e`` is
    quantized as the 2-D matrix it is, not with an amax over all experts.  The tiny model's experts
    are given different ranges so that a shared scale would differ."""
    model, _ = tiny_model("tiny-mixtral")
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj.mul_(torch.arange(1, len(experts.gate_up_proj) + 1).view(-1, 1, 1) ** 2)
    gate_up = experts.gate_up_proj.detach().clone()
    pts = (lambda w: {"per_tensor_scale": nvfp4_per_tensor_scale(w)}) if fmt == "nvfp4" else (lambda w: {})
    per_expert = torch.stack([fake_quantize(w, fmt, **pts(w)) for w in gate_up])
    shared = fake_quantize(gate_up, fmt, **pts(gate_up))
    assert not torch.equal(per_expert, shared)
    with QuantInjector(model, fmt, "weight", per_tensor_scale="amax" if fmt == "nvfp4" else None):
        assert torch.equal(experts.gate_up_proj, per_expert)
    assert torch.equal(experts.gate_up_proj, gate_up)


def test_2d_tiles_quantize_conv1d_and_experts_as_their_input_dim_matrices() -> None:
    """``mxfp4_2d`` tiles (out, in) 32x32: GPT-2's (in, out) Conv1D gets the transposed tiles,
    fused experts one expert's matrix at a time."""
    gpt2, _ = tiny_model("tiny-gpt2")
    mixtral, _ = tiny_model("tiny-mixtral")
    c_fc, experts = gpt2.transformer.h[0].mlp.c_fc, mixtral.model.layers[0].mlp.experts
    w, gate_up = c_fc.weight.detach().clone(), experts.gate_up_proj.detach().clone()
    with QuantInjector(gpt2, "mxfp4_2d"), QuantInjector(mixtral, "mxfp4_2d"):
        assert torch.equal(c_fc.weight, fake_quantize(w.t(), "mxfp4_2d").t())
        assert torch.equal(experts.gate_up_proj[1], fake_quantize(gate_up[1], "mxfp4_2d"))
