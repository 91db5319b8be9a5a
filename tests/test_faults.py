"""Faults, misuse and concurrency: nested and reused injectors, baseline files under
concurrent writers and ``kill -9``, corrupt caches.  Each case failed before the fix."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import cache
from harness.baselines import (
    BaselineError,
    comparison_table,
    read_baseline_file,
    tolerance_for,
    write_baselines,
)
from harness.formats import fake_quantize, fast
from harness.inject import QuantInjector
from harness.models import load_model, model_identity, save_converted

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return load_model("tiny-llama")[0]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 35).reshape(2, 16)).logits


def test_nested_injectors_inner_wins_and_outer_comes_back(tiny: nn.Module) -> None:
    ref = _logits(tiny)
    with QuantInjector(tiny, "nvfp4"):
        nvfp4_alone = _logits(tiny)
    with QuantInjector(tiny, "mxfp4"):
        mxfp4_alone = _logits(tiny)
    weights = {n: p for n, p in tiny.named_parameters()}
    with QuantInjector(tiny, "mxfp4"):
        with QuantInjector(tiny, "nvfp4"):
            inner = _logits(tiny)
        after_inner = _logits(tiny)
    # inner: nvfp4 on the original weights (not nvfp4 of mxfp4); after it: mxfp4 again, not the reference
    assert torch.equal(inner, nvfp4_alone)
    assert torch.equal(after_inner, mxfp4_alone)
    assert not torch.equal(after_inner, ref)
    assert torch.equal(_logits(tiny), ref)
    assert all(p is weights[n] for n, p in tiny.named_parameters())  # the same Parameters are back


def test_reusing_one_injector_does_not_double_its_modules(tiny: nn.Module) -> None:
    inj = QuantInjector(tiny, "mxfp4")
    with inj:
        first = list(inj.modules)
    with inj:
        second = list(inj.modules)
    assert len(first) == 14 and second == first  # 2 layers x 7 Linear, lm_head excluded


def test_a_model_without_linear_layers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear module"):
        QuantInjector(nn.Sequential(nn.Conv1d(2, 2, 1)), "mxfp4").__enter__()


# --- baseline files ---------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from harness.baselines import write_baselines
path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # start together
for i in range(n):
    write_baselines(path, {f"{tag}-{i}": {"loss": float(i)}})
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs
    )


def test_two_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    writers = [_python(WRITER, str(path), tag, "200") for tag in ("a", "b")]
    for w in writers:
        assert w.stdout.readline().strip() == "ready"
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    cases = read_baseline_file(path)[0]
    assert len(cases) == 400 and cases["a-199"] == {"loss": 199.0} and cases["b-0"] == {"loss": 0.0}


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from harness.baselines import write_baselines
def stuck(src, dst):  # the temp file is complete, the rename has not happened: kill -9 here
    print("writing", flush=True)
    time.sleep(600)
os.replace = stuck
write_baselines(Path(sys.argv[1]), {"new": {"loss": 2.0}})
"""


def test_kill_9_mid_write_keeps_the_old_file_and_the_next_write_removes_the_temp(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    write_baselines(path, {"old": {"loss": 1.0}})
    before = path.read_bytes()
    writer = _python(KILLED_WRITER, str(path))
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert path.read_bytes() == before
    assert len(list(tmp_path.glob("suite.json.*.tmp"))) == 1  # the orphan of the killed writer
    write_baselines(path, {"next": {"loss": 3.0}})  # the lock died with the writer
    assert read_baseline_file(path)[0] == {"old": {"loss": 1.0}, "next": {"loss": 3.0}}
    assert list(tmp_path.glob("*.tmp")) == []


def test_a_baseline_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    llama, qwen = (model_identity(load_model(name)[0]) for name in ("tiny-llama", "tiny-qwen2"))
    write_baselines(path, {"a": {"loss": 1.0}}, identity=llama)
    assert json.loads(path.read_text())["model"] == llama
    assert read_baseline_file(path, llama)[0] == {"a": {"loss": 1.0}}
    message = (
        rf"{path} holds the baselines of another model \(architecture LlamaForCausalLM, layers 2, .*"
        "the model under test is architecture Qwen2ForCausalLM"
    )
    with pytest.raises(BaselineError, match=message):
        read_baseline_file(path, qwen)
    with pytest.raises(BaselineError, match=message):
        write_baselines(path, {"b": {"loss": 1.0}}, identity=qwen)
    # same weights, other seed: same architecture and config, other weights hash
    other_seed = model_identity(load_model("tiny-llama", seed=1)[0])
    assert (
        other_seed["config_sha256"] == llama["config_sha256"]
        and other_seed["weights_sha256"] != llama["weights_sha256"]
    )
    with pytest.raises(BaselineError, match="another model"):
        read_baseline_file(path, other_seed)


@pytest.mark.parametrize(
    "cases, items, where",
    [
        ({"a": {"loss": "1.5"}}, {}, r"cases\.a\.loss is '1\.5', not a number"),
        ({"a": {"loss": True}}, {}, r"cases\.a\.loss is True, not a number"),
        ({"a": {"loss": 1.0}}, {"a": {"exact_match": ["0101"]}}, r"items\.a\.exact_match\[0\] is '0101', not a number"),
        ({"a": {"loss": 1.0}}, {"a": {"exact_match": "0101"}}, r"items\.a\.exact_match is str, not a list"),
        ({"a": [1.0]}, {}, r"cases\.a is list, not an object"),
    ],
)
def test_schema_rejects_non_numbers(tmp_path: Path, cases, items, where: str) -> None:
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"schema_version": 1, "cases": cases, "items": items}))
    with pytest.raises(BaselineError, match=rf"corrupted baseline file \({where}"):
        read_baseline_file(path)


def test_nan_is_never_stored_nor_equal_and_inf_is_explicit(tmp_path: Path) -> None:
    path = tmp_path / "suite.json"
    with pytest.raises(BaselineError, match=r"a: loss is NaN: the run failed"):
        write_baselines(path, {"a": {"loss": math.nan}})
    with pytest.raises(BaselineError, match=r"a: exact_match is NaN"):
        write_baselines(path, {"a": {"loss": 1.0}}, {"a": {"exact_match": [1.0, math.nan]}})
    assert not path.exists()
    write_baselines(path, {"a": {"sqnr_db": math.inf, "loss": 1.0}, "b": {"sqnr_db": -math.inf}})
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the file"))  # strict JSON
    assert '"sqnr_db": "inf"' in text and read_baseline_file(path)[0]["b"] == {"sqnr_db": -math.inf}
    path.write_text(text.replace('"loss": 1.0', '"loss": NaN'))
    with pytest.raises(BaselineError, match=r"cases\.a\.loss is nan, not a number"):
        read_baseline_file(path)
    tol = tolerance_for("sqnr_db")
    assert not tol.allows(math.nan, math.nan) and not tol.allows(1.0, math.nan)
    assert tol.allows(math.inf, math.inf) and not tol.allows(math.inf, -math.inf) and not tol.allows(math.inf, 90.0)
    assert not comparison_table({"loss": math.nan}, {"loss": math.nan})[0]


# --- caches -----------------------------------------------------------------------------------

QUANTIZE = """
import torch
from harness.formats import fake_quantize
from harness.formats.fast import unavailable_reason
x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
same = torch.equal(fake_quantize(x, "mxfp4"), fake_quantize(x, "mxfp4", backend="reference"))
print("fast" if not unavailable_reason() else "reference", same)
"""
PLANTED = '#include <stdio.h>\n__attribute__((constructor)) static void run(void) { puts("PLANTED"); }\n'


def _quantize_in(cache: Path) -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", QUANTIZE],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # a Bus error would be -7
    return proc.stdout.strip(), proc.stderr


@pytest.mark.skipif(fast.unavailable_reason() != "", reason="needs a C compiler for the fast path")
def test_a_truncated_or_planted_kernel_is_rebuilt_never_loaded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    built = cache.cached_dir(fast.kernel_dir(), lambda d: fast._compile("cc", d), "the C kernel")  # not loaded here
    library = built / fast.LIBRARY
    good = library.read_bytes()
    library.write_bytes(good[: len(good) // 2])
    out, err = _quantize_in(tmp_path)
    assert out == "fast True"
    assert err == (
        f"harness: the C kernel in {built}: fast_kernel.so does not match its recorded sha256 (truncated or "
        "corrupt); rebuilding it\n"
    )
    assert library.read_bytes() == good  # the build is deterministic
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    out, err = _quantize_in(tmp_path)
    assert out == "fast True" and "PLANTED" not in out and "rebuilding it" in err


@pytest.fixture
def fresh_kernel():
    """Forget the process's loaded kernel before and after the case."""
    fast._build.cache_clear()
    yield
    fast._build.cache_clear()


@pytest.mark.skipif(fast.unavailable_reason() != "", reason="needs a C compiler for the fast path")
def test_an_unwritable_kernel_cache_builds_elsewhere_with_a_warning(monkeypatch, capsys, fresh_kernel) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", "/proc/harness-cache")  # not writable, even for root
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(x, "mxfp4"), fake_quantize(x, "mxfp4", backend="reference"))
    err = capsys.readouterr().err
    assert err.startswith("harness: warning: the cache /proc/harness-cache/kernels is not writable")
    assert fast.unavailable_reason() == ""  # the fast path still runs, from a temporary directory


def test_cached_dir_builds_once_rebuilds_corrupt_and_records_hashes(tmp_path: Path, capsys) -> None:
    builds = []

    def build(directory: Path) -> None:
        builds.append(directory)
        (directory / "weights.bin").write_bytes(bytes(range(256)) * 64)

    target = tmp_path / "artifact"
    assert cache.cached_dir(target, build, "the artifact") == target
    assert cache.cached_dir(target, build, "the artifact") == target and len(builds) == 1
    manifest = (target / "SHA256SUMS").read_text()
    assert manifest == f"{hashlib.sha256(bytes(range(256)) * 64).hexdigest()}  weights.bin\n"
    with (target / "weights.bin").open("r+b") as f:
        f.truncate(100)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"artifact.{dead.stdout.strip()}.x1.tmp").mkdir()  # what a builder killed mid-build leaves
    capsys.readouterr()
    assert cache.cached_dir(target, build, "the artifact") == target and len(builds) == 2
    err = capsys.readouterr().err
    assert err == (
        f"harness: the artifact in {target}: weights.bin does not match its recorded sha256 (truncated or corrupt); "
        "rebuilding it\n"
    )
    assert (target / "weights.bin").stat().st_size == 256 * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no temp dirs, no lock file left


def test_the_converted_model_cache_is_a_valid_model_directory(tmp_path: Path) -> None:
    model, tok = load_model("tiny-qwen2")
    target = cache.cached_dir(tmp_path / "tiny", lambda d: save_converted(model, tok, d), "the conversion")
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    del config["architectures"]  # as the GGUF conversions before this fix wrote it
    (target / "config.json").write_text(json.dumps(config))
    again, _ = load_model(str(target))
    assert model_identity(again) == model_identity(model)
