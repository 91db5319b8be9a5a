"""``--device-map auto`` (accelerate): a tiny model whose ``max_memory`` leaves no room for its
decoder layers on the CPU is split between the CPU and disk offload; input-point losses equal
the single-device run's, and weight-point quantization of offloaded weights is refused, not
computed on placeholders."""

from __future__ import annotations

import pytest
import torch

from harness import cli
from harness.eval.loss import evaluate_loss
from harness.gsm8k import load_gsm8k
from harness.inject import QuantInjector
from harness.models import load_model, parse_max_memory

# tiny-llama holds 362,048 bytes in fp32: its embedding (tied with lm_head) fits, the layers do not
MAX_MEMORY = {"cpu": 260_000, "disk": 10**9}


def _per_item(model, tok, point: str) -> dict[str, list[float]]:
    with QuantInjector(model, "mxfp4", point) as inj:
        return evaluate_loss(model, tok, load_gsm8k("test", 4), inj, batch_size=2).per_item()


def test_offloaded_layers_give_the_single_device_losses():
    whole, tok = load_model("tiny-llama")
    split, _ = load_model("tiny-llama", device_map="auto", max_memory=MAX_MEMORY)
    placed = set(split.hf_device_map.values())
    assert placed == {"cpu", "disk"}, split.hf_device_map
    for name, module in split.named_modules():  # accelerate never splits a Linear
        if isinstance(module, torch.nn.Linear):
            assert len({p.device for p in module.parameters()}) == 1, name
    assert _per_item(split, tok, "input") == _per_item(whole, tok, "input")
    with pytest.raises(ValueError, match="offloaded"):
        _per_item(split, tok, "weight")


def test_max_memory_option_is_checked(capsys):
    assert parse_max_memory("0=20GiB,cpu=60GiB,disk=900GB") == {0: "20GiB", "cpu": "60GiB", "disk": "900GB"}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "loss", "--format", "mxfp4", "--max-memory", "gpu=1GB"])
    assert "bad max_memory entry 'gpu=1GB'; valid: DEVICE=SIZE" in capsys.readouterr().err
