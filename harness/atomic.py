"""All-or-nothing writing of documents and report folders.

A :class:`Transaction` stages every output of a command beside its target (a temporary file or
folder in the same directory, so the final ``rename(2)`` stays on one filesystem and is atomic)
and commits them together at the end: each staged file is flushed to disk (``fsync``), given the
mode of the file it replaces (``0o666`` less the umask for a new one) and renamed over the
target; a staged folder replaces the target folder whole (the old one is moved aside, then
removed). The commit runs under a lock per target and with SIGINT held back until it is done, so
a full disk, an I/O error or Ctrl-C while staging leaves every previous result byte-identical,
and two writers of one target never interleave. A symlinked target has its *target* replaced
(the link is kept). This is the temp-file-and-rename pattern of ``rename(2)`` in POSIX.1-2017.

Locks are ``flock(2)`` locks on files in a folder of the system's temporary directory, never in
the user's tree. An existing target that is not a harness document of the same kind is refused
(:class:`NotOurs`) unless ``force`` is given."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

LOCK_DIR = "harness-locks"


class NotOurs(ValueError):
    """An existing output that is not a harness document of the expected kind."""


class WriteError(OSError):
    """Staging or committing the outputs failed; says which previous results are untouched."""

    def __str__(self) -> str:
        return self.strerror


Recognizer = Callable[[Path], bool]


def json_with(*keys: str) -> Recognizer:
    """Recognizes a JSON object holding every one of ``keys`` (a harness document's own fields)."""

    def recognize(path: Path) -> bool:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)

    return recognize


def folder_with(name: str, recognize: Recognizer) -> Recognizer:
    """Recognizes a folder that is empty or holds ``name`` recognized by ``recognize``."""

    def recognize_folder(path: Path) -> bool:
        return path.is_dir() and (not any(path.iterdir()) or recognize(path / name))

    return recognize_folder


class Kind(str, Enum):
    """The outputs the commands replace, each recognized by its own fields."""

    SCAN = "an SRDD scan document (scan --output)"
    SCAN_REPORT = "an SRDD scan report folder (scan --report-dir)"
    GSM8K_RUN = "a GSM8K run document (eval gsm8k --output)"
    AQN_REPORT = "an AQN comparison report (aqn compare --output)"


_SCAN = json_with("schema_version", "model", "format", "point", "layers")
_AQN = json_with("rows", "fmt", "strategies", "seeds")
_GSM8K_V0 = json_with("model", "task", "result")
RECOGNIZERS: dict[Kind, Recognizer] = {
    Kind.SCAN: _SCAN,
    Kind.SCAN_REPORT: folder_with("results.json", _SCAN),
    # a per-item document (harness.peritem), or one written before it
    Kind.GSM8K_RUN: lambda path: json_with("schema", "item_ids", "per_item")(path) or _GSM8K_V0(path),
    # the markdown is recognized by the JSON written beside it
    Kind.AQN_REPORT: lambda path: _AQN(path if path.suffix == ".json" else path.with_suffix(".json")),
}


def check_target(path: str | os.PathLike, kind: Kind, force: bool = False) -> Path:
    """``path`` as a Path; :class:`NotOurs` when something there is not a harness document of
    ``kind`` and ``force`` is not given. Call it before any work."""
    target = Path(path).expanduser()
    if force or not (target.exists() or target.is_symlink()) or RECOGNIZERS[kind](target):
        return target
    raise NotOurs(f"{target} exists and is not {kind.value}: not replacing it (pass --force to replace it)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    _fsync(folder)


def _lock_dir() -> Path:
    """A folder every user can lock in (mode 1777, like /tmp), else this user's own."""
    shared = Path(tempfile.gettempdir(), LOCK_DIR)
    try:
        shared.mkdir(mode=0o1777, exist_ok=True)
        if shared.stat().st_uid == os.getuid():
            shared.chmod(0o1777)
        if os.access(shared, os.W_OK | os.X_OK):
            return shared
    except OSError:
        pass
    own = shared.with_name(f"{LOCK_DIR}-{os.getuid()}")
    own.mkdir(mode=0o700, exist_ok=True)
    return own


_HELD: set[str] = set()  # real paths this process holds the lock of (the lock is re-entrant)


@contextlib.contextmanager
def lock(target: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on ``target`` (by its real path), re-entrant within the process, held in
    the system's temporary directory; released when the block ends or the process dies."""
    real = os.path.realpath(target)
    if real in _HELD:
        yield
        return
    path = _lock_dir() / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_uid == os.getuid():
                os.fchmod(fd, 0o666)  # other users of a shared folder lock it too
        fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.add(real)
        try:
            yield
        finally:
            _HELD.discard(real)
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def sigint_held(caught: list[int]) -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block ends, appending to ``caught`` instead (main
    thread only; elsewhere signals are not delivered anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Staged:
    target: Path  # the real path replaced (a symlink's target)
    staged: Path  # the temporary file or folder beside it
    folder: bool
    replaced: bool = False


@dataclass
class Transaction:
    """Outputs staged with :meth:`file` and :meth:`folder`, committed together when the ``with``
    block ends without an exception, or all discarded (see the module docstring)."""

    _staged: list[_Staged] = field(default_factory=list)

    def file(self, path: str | os.PathLike) -> Path:
        """A temporary path to write ``path``'s new content to (inside a staged folder when
        ``path`` lies in one)."""
        return self._stage(Path(path).expanduser(), folder=False)

    def folder(self, path: str | os.PathLike) -> Path:
        """An empty temporary folder to fill; it replaces the folder ``path`` whole."""
        return self._stage(Path(path).expanduser(), folder=True)

    def _stage(self, path: Path, folder: bool) -> Path:
        target = Path(os.path.realpath(path))
        for staged in self._staged:
            if staged.folder and target.is_relative_to(staged.target) and target != staged.target:
                inner = staged.staged / target.relative_to(staged.target)
                inner.parent.mkdir(parents=True, exist_ok=True)
                return inner
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = f"{target.name}.{os.getpid()}.", ".tmp"
        if folder:
            staged = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
            staged.chmod(0o777 & ~_umask())
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
            os.close(fd)
            staged = Path(name)
        self._staged.append(_Staged(target, staged, folder))
        return staged

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind, error, tb) -> None:
        names = ", ".join(str(s.target) for s in self._staged) or "nothing"
        interrupted: list[int] = []
        try:
            if error is None:
                self._commit(interrupted)
        except BaseException as err:  # the commit failed: report it as the body's failure would be
            error = err
        finally:
            self._discard()
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{names} not written; any previous one is unchanged") from None
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "an I/O error"
            done = [str(s.target) for s in self._staged if s.replaced]
            names = ", ".join(str(s.target) for s in self._staged if not s.replaced)
            written = f"; {', '.join(done)} written" if done else ""
            message = f"{names} not written ({reason}: {error}); any previous one is unchanged{written}"
            raise WriteError(error.errno, message) from None
        if error is not None and kind is None:
            raise error  # any other failure of the commit itself
        if interrupted:
            raise KeyboardInterrupt(f"{names} written (complete) as the interrupt came")

    def _commit(self, interrupted: list[int]) -> None:
        for staged in self._staged:
            (_fsync_tree if staged.folder else _fsync)(staged.staged)
        with contextlib.ExitStack() as stack:
            for target in sorted({str(s.target) for s in self._staged}):
                stack.enter_context(lock(target))
            for staged in self._staged:
                _remove_orphans(staged.target)
            with sigint_held(interrupted):
                for staged in self._staged:
                    _replace(staged)
                    staged.replaced = True

    def _discard(self) -> None:
        for staged in self._staged:
            _remove(staged.staged)


def _remove_orphans(target: Path) -> None:
    """Temporaries of ``target`` whose writer process is gone (killed mid-write); under its lock."""
    for orphan in target.parent.glob(f"{target.name}.*.tmp"):
        pid = orphan.name[len(target.name) + 1 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(orphan)


def _replace(staged: _Staged) -> None:
    target, new = staged.target, staged.staged
    if staged.folder:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(new, target)
            _remove(old)
        else:
            os.replace(new, target)
    else:
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        new.chmod(mode)
        os.replace(new, target)
    _fsync(target.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to ``path`` all-or-nothing (one :class:`Transaction`); the real path."""
    with Transaction() as tx:
        tx.file(path).write_text(text)
    return Path(os.path.realpath(path))
