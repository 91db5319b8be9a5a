"""AQN building blocks: the schedule against QeRL's published formula, validation, the noise
context, target detection."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from harness.aqn.configs import CONFIGS, get_config, load_config
from harness.aqn.noise import NoiseInjector
from harness.aqn.schedule import ScheduleError, SigmaSchedule
from harness.inject import QuantInjector
from harness.models import load_model

VALID = [c for c in CONFIGS.values() if c.sigma_end > 0]


def qerl_sigma(step: int, total_steps: int, sigma_start: float, sigma_end: float, num_stages: int) -> float:
    """QeRL's noise scheduler, written out independently: geometric trend of num_stages - 1
    values, num_stages equal intervals, the first one without noise."""
    trend = [sigma_start * (sigma_end / sigma_start) ** (i / (num_stages - 2)) for i in range(num_stages - 1)]
    step = min(step, total_steps)
    interval = int(step // (total_steps / (len(trend) + 1)))
    return 0 if interval == 0 else trend[min(interval - 1, len(trend) - 1)]


@pytest.mark.parametrize("total_steps", [10, 58, 100, 174])
@pytest.mark.parametrize("config", VALID, ids=lambda c: c.name)
def test_schedule_matches_qerl_to_1e_12(config, total_steps: int) -> None:
    schedule = config.schedule(total_steps)
    for step in range(total_steps + 3):
        expected = qerl_sigma(step, total_steps, config.sigma_start, config.sigma_end, config.num_stages)
        assert schedule.sigma_at(step) == pytest.approx(expected, abs=1e-12, rel=1e-12)
    assert schedule.trend[0] == config.sigma_start and schedule.trend[-1] == pytest.approx(config.sigma_end, rel=1e-12)


def test_qerl_default_on_the_experiments_58_steps() -> None:
    """QeRL's schedule over 58 steps: steps 0-5 warm-up, 6-11 at 0.05, 12-17 at 0.0281 ... down to 0.0005."""
    values = get_config("qerl-default").schedule(58).values()
    assert values[:6] == [0.0] * 6 and values[6:12] == [0.05] * 6
    assert values[12] == pytest.approx(0.05 * 0.01 ** (1 / 8)) == pytest.approx(0.02812, abs=1e-5)
    assert values[-1] == pytest.approx(0.0005)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.05, 0.0, 10, 58), r"sigma_end must be > 0.*\[0.05, 0, 0, \.\.\.\].*broken AQN"),
        ((0.0, 0.0, 10, 58), r"sigma_start must be > 0"),
        ((0.01, 0.05, 10, 58), r"sigma_end 0.05 > sigma_start 0.01: the schedule must decay"),
        ((0.05, 0.0005, 2, 58), r"num_stages must be >= 3"),
        ((0.05, 0.0005, 10, 9), r"total_steps 9 < num_stages 10"),
    ],
)
def test_invalid_schedules_raise_with_the_reason(args, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        SigmaSchedule(*args)


def test_the_broken_configuration_raises_before_any_noise() -> None:
    with pytest.raises(ScheduleError, match="sigma_end must be > 0"):
        get_config("broken-sigma-end-0").schedule(58)
    with pytest.raises(ValueError, match="unknown AQN configuration 'qerl'; valid AQN configurations: qerl-default"):
        get_config("qerl")


@pytest.mark.parametrize("layer_types, kind", [(("rmsnorm",), "rmsnorm"), (("linear",), "linear")])
def test_noise_is_fresh_each_step_and_gone_on_exit(layer_types, kind: str) -> None:
    model, _ = load_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NoiseInjector(model, layer_types, seed=3) as noise:
        assert {t.kind for t in noise.targets} == {kind}
        target = noise._params[0]
        with noise.noisy(0.1):
            first = target.detach().clone()
            assert not torch.equal(first, before[noise.targets[0].name + ".weight"])
        assert torch.equal(target, before[noise.targets[0].name + ".weight"])  # clean between steps
        with noise.noisy(0.1):
            delta = (target - before[noise.targets[0].name + ".weight"]).std().item()
        assert delta == pytest.approx(0.1, rel=0.15)  # one draw of N(0, 0.1**2), never accumulated
        with pytest.raises(RuntimeError, match="inside"):
            with noise.noisy(0.5):
                raise RuntimeError("inside")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_relative_scale_and_counts() -> None:
    model, _ = load_model("tiny-qwen2")
    with NoiseInjector(model, ("rmsnorm", "linear"), scale="relative", seed=0) as noise:
        kinds = [t.kind for t in noise.targets]
        assert kinds.count("rmsnorm") == 2 * 2 + 1 and kinds.count("linear") == 2 * 7
        weight = noise._params[kinds.index("linear")]
        clean = weight.detach().clone()
        with noise.noisy(0.1):
            ratio = ((weight - clean).std() / clean.pow(2).mean().sqrt()).item()
        assert ratio == pytest.approx(0.1, rel=0.1)


def test_noise_reaches_the_parameter_under_a_quant_injector() -> None:
    model, _ = load_model("tiny-llama")
    q = model.model.layers[0].mlp.up_proj
    original = q.weight
    with QuantInjector(model, "mxfp4"), NoiseInjector(model, ("linear",), seed=0) as noise:
        assert any(p is original for p in noise._params)


def test_moe_default_and_unknown_architectures() -> None:
    """MoE models noise only post_attention_layernorm by default; a model the view does not know
    is refused (its norms and Linears are never guessed by class name)."""
    model, _ = load_model("tiny-mixtral")
    with NoiseInjector(model) as noise:
        assert [t.name for t in noise.targets] == [f"model.layers.{i}.post_attention_layernorm" for i in range(2)]
    unknown = nn.Module()
    unknown.layers = nn.ModuleList([nn.Linear(4, 4)])
    with pytest.raises(ValueError, match=r"architecture Module \(model_type None\) is not one the harness knows"):
        NoiseInjector(unknown)


def test_relative_noise_on_one_plus_w_norms_is_sized_by_the_effective_gain() -> None:
    """Gemma2's norms compute x̂ · (1 + w) with w near 0: relative noise is sigma · RMS(1 + w)."""
    model, _ = load_model("tiny-gemma2")
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.01)  # gains near 1, weights near 0
    clean = norm.weight.detach().clone()
    gain_rms = (clean + 1).pow(2).mean().sqrt().item()
    assert gain_rms > 50 * clean.pow(2).mean().sqrt().item()
    with NoiseInjector(model, include=["model.layers.0.input_layernorm"], scale="relative", seed=0) as noise:
        assert noise.targets[0].offset == 1.0
        with noise.noisy(0.1):
            std = (norm.weight - clean).std().item()
    assert std == pytest.approx(0.1 * gain_rms, rel=0.25)  # 64 draws: sd of a sample sd ~ 9 %
    assert torch.equal(norm.weight, clean)


def test_bad_arguments() -> None:
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match=r"unknown layer type 'norm'; valid layer types: rmsnorm, linear$"):
        NoiseInjector(model, ("norm",))
    with pytest.raises(ValueError, match="unknown noise scale 'percent'"):
        NoiseInjector(model, scale="percent")
    with pytest.raises(ValueError, match="no rmsnorm weight matches"):
        with NoiseInjector(model, include=["decoder.*"]):
            pass


def test_a_configuration_by_name_or_from_a_json_file(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"sigma_start": 0.01, "sigma_end": 0.0001, "num_stages": 3, "scale": "relative"}))
    mine = load_config(str(path))
    assert (mine.name, mine.sigma_start, mine.sigma_end, mine.num_stages) == ("mine", 0.01, 0.0001, 3)
    assert (mine.layer_types, mine.scale, mine.source) == (("rmsnorm",), "relative", str(path))
    assert load_config("1C") is CONFIGS["1C"]
    with pytest.raises(ValueError, match="unknown AQN configuration 'nope'; valid AQN configurations: qerl-default"):
        load_config("nope")
    bad = tmp_path / "bad.json"
    for text, why in (
        ('{"sigma_start": 0.01}', "KeyError('sigma_end')"),
        ("[1]", "AttributeError"),
        ("{", "JSONDecodeError"),
    ):
        bad.write_text(text)
        with pytest.raises(
            ValueError, match=rf"bad.json: not a valid AQN config JSON \({re.escape(why)}.*needs sigma_start"
        ):
            load_config(str(bad))
    with pytest.raises(ValueError, match=r"missing\.json: not a valid AQN config JSON"):
        load_config(str(tmp_path / "missing.json"))
