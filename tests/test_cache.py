"""The cache: an empty ``HARNESS_CACHE_DIR`` is unset, not the working directory; a cache shared
by two users (a mode-1777 folder) serves the second user the first one's artifacts, and where the
second may not replace one, it builds its own elsewhere with a warning instead of failing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import cache
from harness.paths import CACHE_ENV, cache_dir

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def test_an_empty_cache_variable_means_the_default_not_the_working_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, "")
    assert cache_dir() == Path.home() / ".cache" / "harness"
    monkeypatch.setenv(CACHE_ENV, "relative")
    assert cache_dir() == tmp_path / "relative"  # an explicit relative folder is the user's choice


SECOND_USER = """
import sys
from pathlib import Path
from harness import cache
def build(d):
    (d / "x.bin").write_bytes(b"built by the second user")
built = cache.cached_dir(Path(sys.argv[1]), build, "the artifact")
print(built, (built / "x.bin").read_bytes().decode())
"""


def _as_second_user(target: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    return subprocess.run([*command, "-c", SECOND_USER, str(target)], env=env, capture_output=True, text=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A mode-1777 folder both users reach (pytest's own tmp_path is private to the first)."""
    folder = Path(tempfile.mkdtemp(prefix="harness-shared-cache-"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a second user (setpriv)")
def test_a_shared_cache_serves_the_second_user_and_falls_back_where_it_cannot_replace(shared: Path) -> None:
    target = shared / "artifact"
    cache.cached_dir(target, lambda d: (d / "x.bin").write_bytes(b"built by the first user"), "the artifact")

    used = _as_second_user(target)  # the first user's artifact is readable: used as it is
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == f"{target} built by the first user"

    (target / "x.bin").write_bytes(b"corrupt")  # the second user must rebuild, but may not replace it
    rebuilt = _as_second_user(target)
    assert rebuilt.returncode == 0, rebuilt.stderr
    where, text = rebuilt.stdout.strip().split(" ", 1)
    assert where != str(target) and text == "built by the second user"
    assert [line for line in rebuilt.stderr.splitlines() if line.startswith("harness:")][-1].startswith(
        f"harness: warning: the cache {shared} is not writable ("
    )
    assert (target / "x.bin").read_bytes() == b"corrupt"  # the first user's copy is the first user's to fix
