"""The small random SRDD test models shared by tests/test_srdd_criteria.py and
tests/test_srdd_sensitivity.py: a 6-layer Llama with i.i.d. Gaussian Linear weights, the same with
outliers planted in one layer, and the scan both run on them."""

from __future__ import annotations

import torch

from harness.gsm8k import Gsm8kItem
from harness.models import byte_tokenizer
from harness.srdd.run import scan_model

LAYERS = 6
PLANTED = "model.layers.3"
ITEMS = [Gsm8kItem(f"What is {i} plus {2 * i}?", f"{i} + {2 * i} = {3 * i}\n#### {3 * i}") for i in range(32)]


def gaussian_model(seed: int = 0):
    """A 6-layer Llama whose Linear weights are i.i.d. N(0, 0.02²) (HF's initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    return model, tok


def plant_outliers(model, layer: str = PLANTED) -> None:
    """Two entries per row of each of the layer's Linear weights at ±25 σ: MXFP4 blocks holding
    one crush the other 31 values towards zero."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(layer + ".") and isinstance(module, torch.nn.Linear):
                w = module.weight
                cols = torch.randint(0, w.shape[1], (w.shape[0], 2), generator=g)
                w.scatter_(1, cols, 25 * w.std() * torch.sign(torch.randn(w.shape[0], 2, generator=g)))


def scan(model, tok, fmt: str, **kw):
    return scan_model(
        model, tok, ITEMS[:8], fmt, "weight", model_name="gaussian", evaluation=ITEMS, instability_runs=0, **kw
    )


def planted_model():
    """The Gaussian model with outliers planted in ``PLANTED``."""
    model, tok = gaussian_model()
    plant_outliers(model)
    return model, tok
