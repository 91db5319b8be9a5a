"""Vocabularies and registries, with the one error a bad name gets (after lm-eval's
``lm_eval/api/registry.py``: one generic registry, one error message).

A *vocabulary* is a :class:`Vocab`, a ``str`` enum: its members are the valid words (argparse
``choices`` come from :meth:`Vocab.choices`), they compare equal to their plain strings and
f-strings and JSON give the plain value, so code and stored JSON that use strings keep working.
A *registry* (:class:`Registry`) maps names to frozen dataclass entries; adding one is one entry.
Both refuse a bad name with :class:`UnknownName`, one line::

    unknown format 'mxfp5'; valid formats: mxfp4, mxfp4_sr, ...
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Generic, Self, TypeVar

T = TypeVar("T")
_MISSING: Any = object()


class UnknownName(ValueError):
    """A name outside its vocabulary or registry: ``unknown <kind> 'bad'; valid <kinds>: a, b, c``."""

    def __init__(self, kind: str, value: object, valid: Iterable[str], plural: str | None = None) -> None:
        self.kind, self.value, self.valid = kind, value, tuple(str(v) for v in valid)
        super().__init__(f"unknown {kind} {value!r}; valid {plural or kind + 's'}: {', '.join(self.valid)}")


class Vocab(enum.StrEnum):
    """Base of the vocabularies: ``class Point(Vocab, kind="injection point"): ...``; ``plural``
    (default ``kind + "s"``) names the valid choices in the error."""

    def __init_subclass__(cls, *, kind: str, plural: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._kind, cls._plural = kind, plural or kind + "s"

    def __repr__(self) -> str:
        """The plain string's repr, so that messages written ``{value!r}`` read alike for a
        member and its string."""
        return repr(self.value)

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member spelled ``value`` (a member or its string); :class:`UnknownName` otherwise."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise UnknownName(cls._kind, value, cls.choices(), cls._plural) from None

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The members' plain strings, in definition order: argparse ``choices`` and the modules'
        tuples (``POINTS``, ``SCALE_MODES``, ...), for callers that need a plain ``str`` (PyYAML's
        ``safe_dump`` refuses a ``str`` subclass)."""
        return tuple(m.value for m in cls)


class Registry(dict[str, T], Generic[T]):
    """Name -> frozen dataclass entry (keyed by its ``name``), in registration order.

    A ``dict`` (iteration, ``in``, ``values()`` and ``registry[name]`` as usual) that refuses a
    second entry under a taken name; ``get(name)`` without a default raises :class:`UnknownName`.
    """

    def __init__(self, kind: str, entries: Iterable[T] = (), *, plural: str | None = None) -> None:
        super().__init__()
        self.kind, self.plural = kind, plural or kind + "s"
        for entry in entries:
            self.register(entry)

    def register(self, entry: T) -> T:
        """Add ``entry`` under its ``name``; ValueError when the name is taken."""
        self[entry.name] = entry  # type: ignore[attr-defined]
        return entry

    def __setitem__(self, name: str, entry: T) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        super().__setitem__(name, entry)

    def get(self, name: str, default: Any = _MISSING) -> T:  # type: ignore[override]
        """The entry ``name``: ``default`` when given and there is none, else :class:`UnknownName`."""
        try:
            return self[name]
        except (KeyError, TypeError):
            if default is not _MISSING:
                return default
            raise UnknownName(self.kind, name, self, self.plural) from None

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self)
