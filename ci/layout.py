"""Regenerate the module table of docs/layout.md from the package itself: every module of
``harness`` (found with ``pkgutil.walk_packages``, so a new module cannot be forgotten) with the
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


def module_table() -> str:
    package = ROOT / "harness"
    rows = ["| module | what it does |", "| --- | --- |"]
    for info in sorted(pkgutil.walk_packages([str(package)], "harness."), key=lambda m: m.name):
        rel = Path(*info.name.split(".")[1:])
        path = package / rel / "__init__.py" if info.ispkg else package / rel.with_suffix(".py")
        rows.append(f"| `{info.name}` | {first_sentence(path)} |")
    return "\n".join(rows)


def main() -> None:
    text = PAGE.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{module_table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
