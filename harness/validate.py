"""Checks of user input done before any model is loaded or any item evaluated: counts,
devices, output paths and comparison files.  Each failure is a one-line message naming the bad
value and what would be valid; the CLI turns them into exit code 2 without a traceback.

The ``*_arg`` functions are argparse ``type=`` converters (argparse reports their
``ArgumentTypeError`` as ``argument --items: ...`` and exits 2)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from harness.peritem import Dataset, items_differ, read_document


class UsageError(ValueError):
    """Bad input found before any work: the CLI prints ``error: <message>`` and exits 2."""


def count_arg(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum`` (``--items 0`` / ``-3`` are refused before any work)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (valid: an integer >= {minimum})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range (valid: an integer >= {minimum})")
        return value

    convert.__name__ = f"integer >= {minimum}"
    return convert


def device_arg(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` with N a visible CUDA device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    valid = "cpu" + (f", cuda, cuda:0..cuda:{count - 1}" if count else " (no CUDA device is visible here)")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid devices: {valid}") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; valid devices: {valid}")
    if count == 0 or (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f"device {text!r} is not available; valid devices: {valid}")
    return text


def _writable_dir(directory: Path, what: str) -> None:
    """``directory`` (existing or to be created) can take new files: its nearest existing
    ancestor is a directory we can create a file in (tried, not guessed from permission bits)."""
    ancestor = directory
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{what}: cannot write in {ancestor} ({err.strerror})") from None


def output_file_arg(text: str) -> str:
    """A file the run can write at its end: not a directory, in a writable (or creatable) folder;
    an existing file is replaced."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory (valid: a file path)")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not writable")
    _writable_dir(path.parent, repr(text))
    return text


def output_dir_arg(text: str) -> str:
    """A directory the run can write its report into: existing or creatable, not a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file (valid: a directory, existing or new)")
    _writable_dir(path, repr(text))
    return text


def check_compare_to(path: str, task: str, dataset: Dataset) -> dict[str, list[float]]:
    """The per-item values of an ``eval gsm8k --output`` document (read by
    :func:`harness.peritem.read_document`), refused unless it is a run of the same task on the
    same items: ``dataset`` (this run's) and item ids ``0 … n-1``."""
    from harness.eval.gsm8k import TASKS

    doc = read_document(path, "--compare-to")
    theirs = doc.recipe.get("task")
    if doc.kind != "eval gsm8k" or theirs != TASKS[task]:
        raise UsageError(
            f"--compare-to {path} is an `{doc.kind}` document of task {theirs}; this run is `eval gsm8k` of task "
            f"{TASKS[task]}: a paired comparison needs the same task"
        )
    why = items_differ(doc.dataset, doc.item_ids, dataset, tuple(range(dataset.items)))
    if why is not None:
        raise UsageError(f"--compare-to {path} is not comparable with this run: {why}")
    return {m: list(v) for m, v in doc.per_item.items()}


def check_scan_options(attribution: bool, eval_items: int, instability_runs: int | None) -> None:
    """Scan options that contradict each other: attribution needs evaluation items; the
    instability scan needs 0 (skip) or >= 2 runs (a spread of one run is undefined)."""
    if attribution and eval_items == 0:
        raise UsageError("--attribution needs evaluation items: --eval-items is 0 (valid: --eval-items >= 1)")
    if instability_runs == 1:
        raise UsageError("--instability-runs 1 gives no spread (valid: 0 to skip, or an integer >= 2)")
