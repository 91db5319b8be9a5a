"""One job in one Ray task, through the subcommand's own functions (the same calls as the CLI).

``eval loss`` runs :func:`harness.cli.loss_run` (a shard returns the per-item sums of its
``LossResult``, which :func:`merge_shards` concatenates in item order and turns into the document
with ``LossResult.document``, as one task would); every other kind runs the subcommand with
``--output`` in a private temporary folder and returns the document it wrote.  The reference of
KL and top-1 agreement is computed inside each shard, on the shard's own items.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from harness.sweep.plan import JobKind, parse

SHARD_SCHEMA = 1


def check_gpus() -> None:
    """Inside a Ray task that was given GPUs: CUDA shows exactly those (Ray sets
    ``CUDA_VISIBLE_DEVICES`` to the assigned ids), else an error naming both."""
    import ray

    assigned = ray.get_gpu_ids() if ray.is_initialized() else []
    if not assigned:
        return
    import torch

    visible = torch.cuda.device_count()
    if visible != len(assigned):
        raise RuntimeError(
            f"Ray assigned GPUs {assigned} but CUDA shows {visible} device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )


def execute(task: dict) -> dict:
    """Run ``task`` (``{"kind", "argv", "shard"}``): ``{"document": ...}`` (and the command's exit
    status ``rc``), or for a shard ``{"loss_result": per-item sums, "settings": ...}``."""
    from harness.cli import loss_document, loss_run

    check_gpus()
    kind = JobKind(task["kind"])
    args = parse(task["argv"], task["kind"], devices_here=True)
    if kind is JobKind.EVAL_LOSS:
        args.json = True  # no progress bars in a task
        result, settings, _ = loss_run(args)
        if task["shard"]:
            return {"schema_version": SHARD_SCHEMA, "loss_result": asdict(result), "settings": settings}
        return {"document": loss_document(result, settings).to_json(), "rc": 0}
    with tempfile.TemporaryDirectory(prefix="harness-sweep-") as tmp:
        args.output = str(Path(tmp) / "document.json")
        rc = args.run(args)
        return {"document": json.loads(Path(args.output).read_text()), "rc": rc}


def merge_shards(shards: list[dict]) -> dict:
    """The ``eval loss`` document of shards in item order: their per-item sums concatenated into
    one ``LossResult`` (identical to the unsharded run's when the shards batch items alike)."""
    from harness.cli import loss_document
    from harness.eval.loss import LossResult

    merged = LossResult(**{f.name: [v for s in shards for v in s["loss_result"][f.name]] for f in fields(LossResult)})
    digests = [d for s in shards for d in s["settings"]["item_digests"]]  # the items of the whole, in order
    return loss_document(merged, {**shards[0]["settings"], "item_digests": digests}).to_json()
