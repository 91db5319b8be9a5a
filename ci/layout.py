"""Regenerate the module table of docs/layout.md from the package itself: every module of
``harness`` (found with ``pkgutil.iter_modules``, so a new module cannot be forgotten) with the
first sentence of its docstring, read with ``ast`` (nothing is imported).

Run ``python ci/layout.py`` after adding, removing or re-describing a module."""

from __future__ import annotations

import ast
import pkgutil
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "layout.md"
BEGIN, END = "<!-- modules: begin (python ci/layout.py) -->", "<!-- modules: end -->"


ABBREVIATIONS = ("al.", "e.g.", "i.e.", "vs.", "cf.")
LIMIT = 200  # characters of a row's description


def first_sentence(path: Path) -> str:
    """The docstring up to its first full stop that ends a sentence (not "et al.", "e.g."),
    cut at ``LIMIT`` characters with an ellipsis."""
    text = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "(no module docstring)").split())
    for match in re.finditer(r"\.(\s|$)", text):
        if not text[: match.start() + 1].endswith(ABBREVIATIONS):
            text = text[: match.start() + 1]
            break
    if len(text) > LIMIT:
        text = text[: LIMIT - 1].rsplit(" ", 1)[0] + " …"
    return text.replace("|", "\\|")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``), found on disk
    as ``pkgutil.iter_modules`` finds them, level by level, without importing anything."""
    found: dict[str, Path] = {}
    todo = [(ROOT / "harness", "harness.")]
    while todo:
        folder, prefix = todo.pop()
        for info in pkgutil.iter_modules([str(folder)], prefix):
            leaf = info.name.rsplit(".", 1)[-1]
            found[info.name] = folder / leaf / "__init__.py" if info.ispkg else folder / f"{leaf}.py"
            if info.ispkg:
                todo.append((folder / leaf, f"{info.name}."))
    return dict(sorted(found.items()))


def module_table() -> str:
    rows = ["| module | what it does |", "| --- | --- |"]
    rows += [f"| `{name}` | {first_sentence(path)} |" for name, path in modules().items()]
    return "\n".join(rows)


def main() -> None:
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{module_table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
