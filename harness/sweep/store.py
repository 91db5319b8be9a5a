"""Where a sweep keeps its results: one document per job at ``DIR/jobs/<hash>.json``.

``<hash>`` is sha256 (first 20 hex digits) of the job's definition (:func:`definition`): the
subcommand's full parsed options (defaults included), the model's identity (:func:`model_fingerprint`),
the item shard and the harness version, so a changed definition gets a new path and an unchanged
one is found and skipped.  Beside each document, ``<hash>.meta.json`` records the job's key,
definition, status and error; ``DIR/sweep.json`` lists the plan's jobs.  Every file is written to a
temporary file beside it and renamed over the target (:mod:`harness.atomic`), so
an interrupted sweep leaves each file either whole or absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness import __version__
from harness.atomic import write_text
from harness.sweep.plan import Job, parse

FINGERPRINT_BYTES = 1 << 20  # hashed from the start and the end of each weight file
MANIFEST = "sweep.json"
DONE, FAILED, PENDING = "done", "failed", "pending"


def write_json(path: Path, doc: object) -> Path:
    """``doc`` as JSON at ``path``, all-or-nothing (:func:`harness.atomic.write_text`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(doc, indent=2) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def model_fingerprint(spec: str) -> str:
    """An embedded or tiny model: its name (the harness version pins its weights).  A directory:
    sha256 of its config and tokenizer files and, per ``*.safetensors`` file, its size and its
    first and last MiB.  A missing directory: ``missing:<path>`` (the job then fails, loudly)."""
    from harness.models import EMBEDDED, TINY

    if spec in EMBEDDED or spec in TINY:
        return spec
    path = Path(spec)
    if not path.is_dir():
        return f"missing:{path.resolve()}"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix == ".json" or f.suffix == ".model":
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(FINGERPRINT_BYTES)
                fh.seek(max(0, size - FINGERPRINT_BYTES))
                h.update(f"{f.name}:{size}".encode() + head + fh.read())
    return h.hexdigest()[:16]


def definition(job: Job, argv: tuple[str, ...] | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Everything a job's result depends on: the parsed options of ``argv`` (default: the job's),
    the model's fingerprint, the shard and the harness version."""
    ns = parse(argv or job.argv, job.key)
    opts = {k: v for k, v in sorted(vars(ns).items()) if k not in ("run", "output", "json")}
    return {
        "command": job.kind.value,
        "options": json.loads(json.dumps(opts, default=str)),
        "model_fingerprint": model_fingerprint(job.model),
        "shard": list(shard) if shard else None,
        "harness_version": __version__,
    }


def digest(defn: dict) -> str:
    return hashlib.sha256(json.dumps(defn, sort_keys=True).encode()).hexdigest()[:20]


class Store:
    """The files of one sweep folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def document(self, h: str) -> Path:
        return self.root / "jobs" / f"{h}.json"

    def meta(self, h: str) -> Path:
        return self.root / "jobs" / f"{h}.meta.json"

    def shard(self, h: str) -> Path:
        return self.root / "shards" / f"{h}.json"

    def done(self, h: str) -> bool:
        return self.document(h).is_file()

    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise ValueError(
                f"{self.root}: not a sweep folder (no {MANIFEST}; run `python -m harness sweep PLAN --out DIR`)"
            )
        return read_json(path)

    def write_manifest(self, plan_path: Path, rows: list[dict]) -> Path:
        return write_json(self.root / MANIFEST, {"plan": str(plan_path), "harness_version": __version__, "jobs": rows})
