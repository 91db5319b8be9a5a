"""A tiny GSM8K folder for the tests that run commands on a few items (test and train splits)."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_gsm8k(folder: Path, n: int = 4) -> Path:
    """``folder`` with ``test.jsonl`` and ``train.jsonl`` of ``n`` items "What is i + i?"."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) for i in range(n)]
    for split in ("test", "train"):
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
