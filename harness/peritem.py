"""The per-item document: what ``eval loss --json`` and ``eval gsm8k --output`` write and what
``gate``, ``eval gsm8k --compare-to`` and the pytest plugin read, through :func:`read_document`
(files) and :meth:`PerItemDocument.from_json` (objects), the one reader.

A document holds one run's value of each metric for each item, named by the item's id, with the
identity of the data set the items came from (sha256 of the items' texts, in order), so two runs
are paired item by item only when they ran on the same items.  Non-finite values (a diverged
item) are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (strict JSON); the reader also
takes the bare ``Infinity``/``NaN`` literals Python's ``json`` writes.  Anything else that is not a
JSON number (``null``, strings such as ``"0.5"``, booleans, objects) is refused, with the file and
the place named in one line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "harness/per-item"
SCHEMA_VERSION = 1
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class DocumentError(ValueError):
    """A per-item document that cannot be read; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Dataset:
    """The items a run evaluated: a name (e.g. ``gsm8k test``), how many, and sha256 (hex) of the
    items' own sha256 hex digests in order (:func:`dataset_of`), so the items of shards evaluated
    apart combine into the identity of the whole."""

    name: str
    items: int
    sha256: str


def item_digests(texts: Iterable[str]) -> list[str]:
    """sha256 (hex) of each item's text (UTF-8)."""
    return [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in texts]


def dataset_of_digests(name: str, digests: Sequence[str]) -> Dataset:
    """:class:`Dataset` of the items with these :func:`item_digests` (in evaluation order)."""
    return Dataset(name, len(digests), hashlib.sha256("".join(digests).encode("ascii")).hexdigest())


def dataset_of(name: str, texts: Iterable[str]) -> Dataset:
    """:class:`Dataset` of the items whose texts are ``texts`` (in evaluation order)."""
    return dataset_of_digests(name, item_digests(texts))


def provenance(command: str) -> dict[str, str]:
    """Who wrote a document: the command, the harness and torch versions, the time (UTC)."""
    import torch

    import harness

    return {
        "command": command,
        "harness_version": harness.__version__,
        "torch_version": torch.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _number(value: object, where: str) -> float:
    """A JSON number (not a bool), or one of the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise DocumentError(f'{where} is {shown}, not a number (a JSON number, or "inf", "-inf", "nan")')
    return float(value)


def per_item_values(values: object, n: int | None = None, where: str = "per_item") -> dict[str, list[float]]:
    """``{metric: [value per item]}`` checked: an object of lists of numbers (:func:`_number`),
    every list ``n`` long (default: as long as the first); DocumentError naming the bad place."""
    if not isinstance(values, Mapping) or not values:
        raise DocumentError(f"{where} is {_kind(values)}, not an object of per-item lists")
    out = {}
    for metric, items in values.items():
        if not isinstance(items, (list, tuple)):
            raise DocumentError(f"{where}.{metric} is {_kind(items)}, not a list of numbers")
        n = len(items) if n is None else n
        if len(items) != n:
            raise DocumentError(f"{where}.{metric} has {len(items)} values for {n} items")
        out[str(metric)] = [_number(x, f"{where}.{metric}[{i}]") for i, x in enumerate(items)]
    return out


def _kind(value: object) -> str:
    return "null" if value is None else "empty" if value in ({}, []) else type(value).__name__


def _encode(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def _strict(value: object) -> object:
    """``value`` with every non-finite float as its string (so the document is strict JSON)."""
    if isinstance(value, float):
        return _encode(value)
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


@dataclass(frozen=True)
class PerItemDocument:
    """One run's per-item values.  ``kind``: the command that wrote it (``eval loss``, ``eval
    gsm8k``); ``model``: its name and identity (:func:`harness.models.model_identity`);
    ``recipe``: format, point, dtype and the command's settings; ``item_ids``: one per item, in
    the order of every ``per_item`` list; ``aggregate``: the run's summary numbers;
    ``provenance``: :func:`provenance`; ``details``: anything else the command reports."""

    kind: str
    model: dict
    recipe: dict
    dataset: Dataset
    item_ids: tuple[int | str, ...]
    per_item: dict[str, tuple[float, ...]]
    aggregate: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.item_ids) != self.dataset.items or len(set(self.item_ids)) != len(self.item_ids):
            raise DocumentError(
                f"{len(self.item_ids)} item ids ({len(set(self.item_ids))} distinct) for a data set of "
                f"{self.dataset.items} items"
            )
        per_item_values(self.per_item, len(self.item_ids))

    @property
    def n(self) -> int:
        return len(self.item_ids)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "model": _strict(self.model),
            "recipe": _strict(self.recipe),
            "dataset": {"name": self.dataset.name, "items": self.dataset.items, "sha256": self.dataset.sha256},
            "item_ids": list(self.item_ids),
            "per_item": {m: [_encode(x) for x in v] for m, v in self.per_item.items()},
            "aggregate": {m: _encode(float(v)) for m, v in self.aggregate.items()},
            "provenance": _strict(self.provenance),
            "details": _strict(self.details),
        }

    def dumps(self) -> str:
        """:meth:`to_json` as strict JSON text (no bare NaN/Infinity)."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, doc: object) -> PerItemDocument:
        """The document of a parsed JSON object; DocumentError naming the first problem."""
        if not isinstance(doc, dict):
            raise DocumentError(f"the document is {_kind(doc)}, not a JSON object")
        if doc.get("schema") != SCHEMA:
            older = "per_item" in doc or "result" in doc
            raise DocumentError(
                "an older per-item document without item ids and data set identity; write it again with this "
                "harness (`eval loss --json`, `eval gsm8k --output`)"
                if older
                else f'not a harness per-item document (no "schema": "{SCHEMA}")'
            )
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise DocumentError(f"schema_version {doc.get('schema_version')!r}; this harness reads {SCHEMA_VERSION}")
        for key in ("model", "recipe", "provenance", "details"):
            if not isinstance(doc.get(key, {}), dict):
                raise DocumentError(f"{key} is {_kind(doc[key])}, not an object")
        if not isinstance(doc.get("kind"), str):
            raise DocumentError(f"kind is {_kind(doc.get('kind'))}, not a string")
        data = doc.get("dataset")
        if not isinstance(data, dict):
            raise DocumentError(f"dataset is {_kind(data)}, not an object with name, items and sha256")
        name, count, digest = data.get("name"), data.get("items"), data.get("sha256")
        if not isinstance(name, str) or not isinstance(digest, str) or type(count) is not int:
            raise DocumentError("dataset needs a string name, an integer items and a string sha256")
        ids = doc.get("item_ids")
        if not isinstance(ids, list) or not all(type(i) in (int, str) for i in ids):
            raise DocumentError(f"item_ids is {_kind(ids)}, not a list of integers or strings")
        aggregate = doc.get("aggregate", {})
        if not isinstance(aggregate, dict):
            raise DocumentError(f"aggregate is {_kind(aggregate)}, not an object")
        return cls(
            kind=doc["kind"],
            model=doc.get("model", {}),
            recipe=doc.get("recipe", {}),
            dataset=Dataset(name, count, digest),
            item_ids=tuple(ids),
            per_item={m: tuple(v) for m, v in per_item_values(doc.get("per_item"), len(ids)).items()},
            aggregate={k: _number(v, f"aggregate.{k}") for k, v in aggregate.items()},
            provenance=doc.get("provenance", {}),
            details=doc.get("details", {}),
        )

    def same_items(self, other: PerItemDocument) -> str | None:
        """None when both ran on the same items (data set identity and ids); else why not."""
        return items_differ(self.dataset, self.item_ids, other.dataset, other.item_ids)


def items_differ(a: Dataset, a_ids: Sequence, b: Dataset, b_ids: Sequence) -> str | None:
    """None when two runs' items are the same (data set identity, ids in the same order); else why not."""
    if a.sha256 != b.sha256:
        return (
            f"different data sets: {a.name} ({a.items} items, sha256 {a.sha256[:12]}) vs {b.name} ({b.items} items, "
            f"sha256 {b.sha256[:12]})"
        )
    if tuple(a_ids) != tuple(b_ids):
        return f"different item ids ({len(a_ids)} vs {len(b_ids)} items, not the same ids in the same order)"
    return None


def read_document(path: str | Path, role: str = "") -> PerItemDocument:
    """The per-item document in ``path``; DocumentError ``"<role> <path>: <problem>"`` (one line)
    for a missing or unreadable file, text that is not JSON (also nested too deeply to parse) and
    any structure :meth:`PerItemDocument.from_json` refuses."""
    label = f"{role} {path}".strip()
    try:
        doc = json.loads(Path(path).read_bytes())
    except IsADirectoryError:
        raise DocumentError(f"{label}: is a directory, not a per-item document") from None
    except OSError as err:
        raise DocumentError(f"{label}: cannot read it ({err.strerror or err})") from None
    except RecursionError:
        raise DocumentError(f"{label}: JSON nested too deeply to be a per-item document") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DocumentError(f"{label}: not JSON ({err})") from None
    try:
        return PerItemDocument.from_json(doc)
    except DocumentError as err:
        raise DocumentError(f"{label}: {err}") from None
