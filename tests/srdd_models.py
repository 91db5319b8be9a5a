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
ALL_ITEMS = [Gsm8kItem(f"What is {i} plus {2 * i}?", f"{i} + {2 * i} = {3 * i}\n#### {3 * i}") for i in range(64)]
ITEMS, HELDOUT = ALL_ITEMS[:32], ALL_ITEMS[32:]  # the attribution's items choose, the others verify


def gaussian_model(seed: int = 0, layers: int = LAYERS, hidden: int = 64, intermediate: int = 128, heads: int = 4):
    """A Llama whose Linear weights are i.i.d. N(0, 0.02²) (HF's initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    return model, tok


def plant_outliers(
    model, layer: str = PLANTED, per_row: int = 2, sigma: float = 25.0, seed: int = 7, spread: float = 0.0
) -> None:
    """``per_row`` entries per row of each of the layer's Linear weights at ±``sigma`` σ (times a
    factor uniform in [1, 1 + ``spread``]): a block holding one is scaled to it, which crushes its
    other values towards zero.  With ``spread = 0`` every outlier has one magnitude, so where that
    magnitude falls on the format's grid (exactly on a scale, just past a rounding boundary)
    decides much of the error at a few σ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(layer + ".") and isinstance(module, torch.nn.Linear):
                w = module.weight
                cols = torch.randint(0, w.shape[1], (w.shape[0], per_row), generator=g)
                signs = torch.sign(torch.randn(w.shape[0], per_row, generator=g))
                size = 1 + spread * torch.rand(w.shape[0], per_row, generator=g) if spread else 1.0
                w.scatter_(1, cols, sigma * w.std() * signs * size)


def scan(model, tok, fmt: str, **kw):
    kw = {"evaluation": ITEMS, "heldout": HELDOUT, "instability_runs": 0} | kw
    return scan_model(model, tok, ITEMS[:8], fmt, "weight", model_name="gaussian", **kw)


def planted_model():
    """The Gaussian model with outliers planted in ``PLANTED``."""
    model, tok = gaussian_model()
    plant_outliers(model)
    return model, tok
