"""Built artifacts in the harness cache (converted models, compiled kernels): built once, atomically,
and verified before every use.

An artifact is a directory.  ``cached_dir(target, build)`` returns ``target`` when every file
listed in its ``SHA256SUMS`` manifest still has the recorded sha256; otherwise it calls
``build(tmp)`` in a temporary sibling directory, records the manifest there and renames it into
place, under ``<target>.lock`` so concurrent builders build once (and the next builder removes
what a killed one left).  A corrupt or truncated artifact
is rebuilt with a one-line notice on stderr, never used.  When the cache directory cannot be
written, the artifact is built in a temporary directory (removed at exit) with a warning.

What this protects against: truncation, corruption and stray files (a file planted without its
manifest entry is rebuilt over, never loaded).  It is not a signature: whoever can write the
cache can also write a matching manifest.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

MANIFEST = "SHA256SUMS"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record ``<sha256>  <name>`` of every file in ``directory`` (sha256sum's format)."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST]
    (directory / MANIFEST).write_text("".join(lines))


def verify(directory: Path) -> str:
    """Empty when every file of ``directory``'s manifest has its recorded sha256, else why not."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        return "missing"
    if not manifest.is_file():
        return f"no {MANIFEST} manifest"
    for line in manifest.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its recorded sha256 (truncated or corrupt)"
    return ""


def notice(message: str) -> None:
    """One line on stderr."""
    print(f"harness: {message}", file=sys.stderr, flush=True)


def _writable(directory: Path) -> str:
    """Empty when files can be created in ``directory`` (made if needed), else the OS error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return str(err)
    return ""


def cached_dir(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """``target`` built by ``build(directory)`` and verified (see the module docstring)."""
    if not verify(target):
        return target
    why_not = _writable(target.parent)
    if why_not:
        tmp = Path(tempfile.mkdtemp(prefix=f"harness-{target.name}-"))
        atexit.register(shutil.rmtree, tmp, True)
        notice(f"warning: the cache {target.parent} is not writable ({why_not}); building {what} in {tmp} for this run")
        build(tmp)
        return tmp
    with FileLock(f"{target}.lock"):
        problem = verify(target)  # another process may have built it while we waited
        if not problem:
            return target
        if target.exists():
            notice(f"{what} in {target}: {problem}; rebuilding it")
        for stale in [*target.parent.glob(f"{target.name}.*.tmp"), *target.parent.glob(f"{target.name}.*.old")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed builder; we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            build(tmp)
            write_manifest(tmp)
            if target.exists():  # moved aside, not deleted in place: readers with open files keep them
                old = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".old", dir=target.parent))
                os.replace(target, old / "artifact")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
