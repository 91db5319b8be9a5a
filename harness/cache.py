"""Built artifacts in the harness cache (converted models, compiled kernels): built once, atomically,
and verified before every use.

An artifact is a directory.  ``cached_dir(target, build)`` returns ``target`` when every file
listed in its ``SHA256SUMS`` manifest still has the recorded sha256; otherwise it calls
``build(tmp)`` in a temporary sibling directory, records the manifest there and renames it into
place (:class:`harness.atomic.Transaction`), under the target's lock so concurrent builders build
once (and the next builder removes what a killed one left).  A corrupt or truncated artifact
is rebuilt with a one-line notice on stderr, never used.  When the cache directory cannot be
written, or holds another user's artifact this user may not replace (a shared cache of mode
1777), the artifact is built in a temporary directory (removed at exit) with a warning.

What this protects against: truncation, corruption and stray files (a file planted without its
manifest entry is rebuilt over, never loaded).  It is not a signature: whoever can write the
cache can also write a matching manifest.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from harness import atomic

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
    """Empty when every file of ``directory``'s manifest has its recorded sha256, else why not
    (also when it cannot be read, e.g. another user's private build)."""
    try:
        return _problem(directory)
    except OSError as err:
        return f"cannot be read ({err})"


def _problem(directory: Path) -> str:
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
    if not why_not:
        try:
            with atomic.lock(target):
                problem = verify(target)  # another process may have built it while we waited
                if not problem:
                    return target
                if target.exists():
                    notice(f"{what} in {target}: {problem}; rebuilding it")
                with atomic.Transaction() as tx:  # replaced whole; readers with open files keep them
                    staged = tx.folder(target)
                    build(staged)
                    write_manifest(staged)
            return target
        except OSError as err:  # e.g. another user's artifact in a shared (mode 1777) cache
            if err.errno not in (errno.EACCES, errno.EPERM):
                raise
            why_not = str(err)
    tmp = Path(tempfile.mkdtemp(prefix=f"harness-{target.name}-"))
    atexit.register(shutil.rmtree, tmp, True)
    notice(f"warning: the cache {target.parent} is not writable ({why_not}); building {what} in {tmp} for this run")
    build(tmp)
    return tmp
