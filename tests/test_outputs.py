"""Documents and reports are all-or-nothing: a full disk (a real tmpfs, and an injected ENOSPC so
CI always runs the path), an I/O error between the files of a report, Ctrl-C during a scan or
while its outputs are written, and a second writer all leave the previous ``--output`` and
report byte-identical; outputs that are not harness documents of the same kind are never
replaced without ``--force``; baseline files keep their mode and symlinks and leave no lock."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from gsm8k_folders import tiny_gsm8k

import harness.models
import harness.srdd.report
from harness import atomic
from harness.baselines import read_baseline_file, write_baselines
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _scan(where: Path, data: Path, prompts: int, *extra: str) -> list[str]:
    return [
        *("scan", "--model", "tiny-llama", "--format", "mxfp8_e4m3", "--no-gain", "--eval-items", "0"),
        *("--instability-runs", "0", "--prompts", str(prompts), "--gsm8k-dir", str(data)),
        *("--output", str(where / "out.json"), "--report-dir", str(where / "report"), *extra),
    ]


def _snapshot(where: Path) -> dict[str, bytes]:
    """Every file under ``where`` (the previous results) by relative path."""
    return {str(p.relative_to(where)): p.read_bytes() for p in sorted(where.rglob("*")) if p.is_file()}


def _one_line_error(argv: list[str], capsys, code: int) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def previous(tmp_path: Path, capsys) -> tuple[Path, Path, dict[str, bytes]]:
    """A folder with yesterday's ``--output`` and report (a scan of 2 prompts), the GSM8K data."""
    data, where = tiny_gsm8k(tmp_path / "data", 8), tmp_path / "results"
    assert main(_scan(where, data, 2)) == 0
    capsys.readouterr()
    return where, data, _snapshot(where)


def _disk_fills_after_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected ENOSPC: every Path.write_text / write_bytes writes half its data, then fails as
    a full disk does."""

    def half(self: Path, data, *args, **kwargs):
        with open(self, "w" if isinstance(data, str) else "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", half)
    monkeypatch.setattr(Path, "write_bytes", half)


def test_an_injected_full_disk_keeps_the_previous_output_and_report(previous, monkeypatch, capsys) -> None:
    where, data, before = previous
    _disk_fills_after_half(monkeypatch)
    line = _one_line_error(_scan(where, data, 3), capsys, 1)
    assert _snapshot(where) == before
    assert "not written (the disk is full" in line and "any previous one is unchanged" in line
    assert sorted(p.name for p in where.iterdir()) == ["out.json", "report"]  # no temporaries left


def test_an_error_between_the_files_of_a_report_keeps_the_old_report_whole(previous, monkeypatch, capsys) -> None:
    """The plots come after results.json: a failure there must not leave the new results.json
    beside the old summary.md."""
    where, data, before = previous

    def failing_plot(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(harness.srdd.report, "_bar_plot", failing_plot)
    line = _one_line_error(_scan(where, data, 3), capsys, 1)
    assert _snapshot(where) == before
    assert "not written (an I/O error" in line


def test_ctrl_c_while_the_outputs_are_written_keeps_them(previous, monkeypatch, capsys) -> None:
    where, data, before = previous

    def interrupted_plot(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.srdd.report, "_bar_plot", interrupted_plot)
    line = _one_line_error(_scan(where, data, 3), capsys, 130)
    assert line.startswith("interrupted: ") and "not written; any previous one is unchanged" in line
    assert _snapshot(where) == before


def test_a_scan_replaces_both_outputs_when_it_succeeds(previous, capsys) -> None:
    where, data, before = previous
    assert main(_scan(where, data, 3)) == 0
    after = _snapshot(where)
    assert set(after) == set(before) and after["out.json"] != before["out.json"]
    assert json.loads(after["out.json"])["prompts"] == 3 and after["out.json"] == after["report/results.json"]
    assert stat.S_IMODE((where / "out.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_keeps_the_previous_output_and_report(tmp_path: Path, capsys) -> None:
    data = tiny_gsm8k(tmp_path / "data", 8)
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        assert main(_scan(disk, data, 2)) == 0
        capsys.readouterr()
        before = _snapshot(disk)
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill the disk to its last block
            while True:
                os.write(fd, b"\0" * 512)
        os.close(fd)
        before["filler"] = (disk / "filler").read_bytes()
        line = _one_line_error(_scan(disk, data, 3), capsys, 1)
        assert _snapshot(disk) == before
        assert "not written (the disk is full" in line
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "out.json", "report"]


SIGINT_SCAN = """
import sys
from harness.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_mid_scan_is_one_line_and_keeps_the_previous_results(previous) -> None:
    where, data, before = previous
    argv = _scan(where, data, 8, "--batch-size", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCAN, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even under CI
    )
    seen = b""
    while b"scan:" not in seen:  # the scan's progress bar: the model is loaded, batches are running
        chunk = proc.stderr.read1(4096)
        assert chunk, f"the scan ended before it started: {seen.decode()}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    err = (seen + err).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # after the unfinished progress bar on its line
    assert [line[line.index("interrupted:") :] for line in err.splitlines() if "interrupted:" in line] == [
        "interrupted: before any output was written (outputs are written all-or-nothing at the end)"
    ]
    assert _snapshot(where) == before


def test_outputs_that_are_not_harness_documents_are_refused_without_force(tmp_path: Path, capsys, monkeypatch) -> None:
    """A typo'd ``--output`` onto the scanned model's config.json, a ``--report-dir`` holding
    another tool's summary.md: refused before the model loads, replaced only with --force."""
    data = tiny_gsm8k(tmp_path / "data", 8)
    model_dir, other_tool = tmp_path / "my-model", tmp_path / "their-report"
    model_dir.mkdir()
    other_tool.mkdir()
    config = model_dir / "config.json"
    config.write_text('{"architectures": ["LlamaForCausalLM"]}')
    (other_tool / "summary.md").write_text("# another tool's summary\n")
    scan = _scan(tmp_path, data, 2)
    load = harness.models.load_model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(harness.models, "load_model", refuse)
    for option, value, kind in (
        ("--output", config, atomic.Kind.SCAN),
        ("--report-dir", other_tool, atomic.Kind.SCAN_REPORT),
    ):
        line = _one_line_error(_with(scan, option, value), capsys, 2)
        assert line == f"error: {value} exists and is not {kind.value}: not replacing it (pass --force to replace it)"
    assert config.read_text() == '{"architectures": ["LlamaForCausalLM"]}'
    assert (other_tool / "summary.md").read_text() == "# another tool's summary\n"

    monkeypatch.setattr(harness.models, "load_model", load)
    assert main([*_with(_with(scan, "--output", config), "--report-dir", other_tool), "--force"]) == 0
    assert json.loads(config.read_text())["format"] == "mxfp8_e4m3"
    assert sorted(p.name for p in other_tool.iterdir()) == [
        "deadzone.png",
        "output_sqnr.png",
        "results.json",
        "sqnr.png",
        "summary.md",
    ]


def _with(argv: list[str], option: str, value: Path) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], str(value), *argv[i + 2 :]]


WRITER = """
import json, sys
from harness.cli import _write_json
path, tag = sys.argv[1], sys.argv[2]
doc = {"model": tag, "task": "gsm8k", "result": {"per_item": [tag] * 200_000}}
for _ in range(30):
    _write_json(path, doc)
"""


def test_two_writers_of_one_output_never_interleave(tmp_path: Path) -> None:
    """Two ``eval gsm8k --output`` writers of the same file (2 MB documents) while a reader reads
    it: the reader only ever sees one writer's complete document."""
    path = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], env=env, stdout=subprocess.DEVNULL)
        for tag in ("a", "b")
    ]
    reads = 0
    while any(w.poll() is None for w in writers):
        with contextlib.suppress(FileNotFoundError):
            doc = json.loads(path.read_text())  # a truncated or interleaved file fails here
            assert len(set(doc["result"]["per_item"])) == 1 and doc["model"] == doc["result"]["per_item"][0]
            reads += 1
    assert [w.returncode for w in writers] == [0, 0] and reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


# --- baseline files ---------------------------------------------------------------------------


def test_a_baseline_keeps_its_mode_and_a_new_one_gets_the_umask_default(tmp_path: Path) -> None:
    shared, new = tmp_path / "shared.json", tmp_path / "new.json"
    write_baselines(shared, {"a": {"loss": 1.0}})
    shared.chmod(0o664)  # a group-writable shared baseline
    write_baselines(shared, {"b": {"loss": 2.0}})
    old_mask = os.umask(0o022)
    try:
        write_baselines(new, {"a": {"loss": 1.0}})
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def test_a_symlinked_baseline_updates_its_target_and_no_lock_is_left(tmp_path: Path) -> None:
    store, repo = tmp_path / "shared-store", tmp_path / "repo" / "baselines"
    store.mkdir()
    repo.mkdir(parents=True)
    target = store / "suite.json"
    write_baselines(target, {"a": {"loss": 1.0}})
    link = repo / "suite.json"
    link.symlink_to(target)
    write_baselines(link, {"b": {"loss": 2.0}})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_baseline_file(target)[0] == {"a": {"loss": 1.0}, "b": {"loss": 2.0}}
    assert sorted(p.name for p in repo.iterdir()) == ["suite.json"]
    assert sorted(p.name for p in store.iterdir()) == ["suite.json"]


def test_a_full_disk_during_a_baseline_write_keeps_the_file_and_says_so(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "suite.json"
    write_baselines(path, {"a": {"loss": 1.0}})
    before = path.read_bytes()
    _disk_fills_after_half(monkeypatch)
    with pytest.raises(OSError, match=r"not written \(the disk is full.*any previous one is unchanged") as exc:
        write_baselines(path, {"b": {"loss": 2.0}})
    assert "\n" not in str(exc.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["suite.json"]


def test_a_killed_writers_temporary_is_removed_only_when_its_process_is_gone(tmp_path: Path) -> None:
    """Temporaries carry their writer's pid: a live writer's is kept, a dead one's removed."""
    target = tmp_path / "out.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"out.json.{dead.stdout.strip()}.{uuid.uuid4().hex[:8]}.tmp"
    live = tmp_path / f"out.json.{os.getppid()}.{uuid.uuid4().hex[:8]}.tmp"
    orphan.write_text("half")
    live.write_text("in progress")
    atomic.write_text(target, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", live.name])
