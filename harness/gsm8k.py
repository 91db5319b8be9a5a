"""GSM8K calibration and evaluation data, read from the JSONL shipped in the package or a local
folder (never downloaded at run time)."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness import paths
from harness.vocab import Vocab

GSM8K_ENV = "HARNESS_GSM8K_DIR"


class Split(Vocab, kind="GSM8K split"):
    """The GSM8K files (``<split>.jsonl`` or ``<split>.jsonl.gz`` in :func:`gsm8k_dir`)."""

    TEST = "test"  # the 1319 test items: every evaluation reads these
    TRAIN = "train"  # the 7473 train items: calibration, AQN training batches and lm-eval's few-shot examples


SPLITS = Split.choices()
LOSS_ITEMS = 32  # the first N test items of a loss/KL evaluation (n >= 32 for paired statistics)
CALIBRATION_ITEMS = 32  # the first N train items a scan calibrates on


@dataclass(frozen=True)
class Gsm8kItem:
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        """The conditioning text of the loss: ``Question: …\\nAnswer:``."""
        return f"Question: {self.question}\nAnswer:"

    @property
    def text(self) -> str:
        """Prompt plus answer, tokenized once for the loss: ``Question: …\\nAnswer: …``."""
        return f"Question: {self.question}\nAnswer: {self.answer}"


def gsm8k_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The GSM8K directory: ``explicit`` (``--gsm8k-dir``), else ``$HARNESS_GSM8K_DIR``, else the
    copy shipped inside the package (``harness/datasets/gsm8k``, gzip-compressed JSONL)."""
    value = explicit or os.environ.get(GSM8K_ENV)
    if not value:
        return paths.data_dir() / "gsm8k"
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"GSM8K directory {str(path)!r} does not exist")
    return path


def gsm8k_file(split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file of one split in :func:`gsm8k_dir`: ``<split>.jsonl`` or ``<split>.jsonl.gz``."""
    split = Split.parse(split)
    folder = gsm8k_dir(data_dir)
    for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"GSM8K directory {str(folder)!r} has neither {split}.jsonl nor {split}.jsonl.gz")


def load_gsm8k(
    split: str = "test", limit: int | None = None, data_dir: str | os.PathLike | None = None
) -> list[Gsm8kItem]:
    """The first ``limit`` items of a split, in file order; a ``limit`` beyond the file's items is
    an error, never a silently shorter run.  A line that is not UTF-8 or not a
    ``{question, answer}`` JSON object, and a file without any item, are errors naming the file
    (and the line)."""
    path = gsm8k_file(split, data_dir)
    items: list[Gsm8kItem] = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                items.append(Gsm8kItem(str(record["question"]), str(record["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{lineno}: malformed GSM8K line ({err!r}); expected {{question, answer}}"
                ) from err
    if not items and limit != 0:
        raise ValueError(f"{path} holds no GSM8K item (expected one {{question, answer}} JSON object a line)")
    if limit is not None and len(items) < limit:
        raise ValueError(f"asked for {limit} {split} items but {path} holds {len(items)} (valid: at most {len(items)})")
    return items
