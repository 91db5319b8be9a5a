"""The house rules of the test folders (docs/layout.md, "Tests and suites"): tests/ holds the harness's own
tests, which never touch the model under test; suites/ holds what users run against a model or a
format; no test module imports from a test module or a conftest (shared code lives in the package,
e.g. harness.testing, or in a suite's helper module such as suites/formats/data.py)."""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("suites/**/*.py")])
MODEL_UNDER_TEST = {"model_under_test"}  # the fixture of --model
# Citations a maintainer of the package cannot follow: the design contract, issue numbers, section
# numbers of the notes of the experiment the harness grew out of, files outside the repository.
INTERNAL_CITATION = re.compile(
    r"design\s*§|design\.md|\(design\b|\bissues?\s+#?\d|experiment(?:'s)?\s+(?:notes|§)|\bshared/", re.I
)


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            modules |= {base} | {f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names}
    return modules


def forbidden_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m.rsplit(".", 1)[-1] == "conftest" or ".test_" in f".{m}"}


def test_no_import_from_a_test_module_or_a_conftest() -> None:
    bad = {p.relative_to(ROOT).as_posix(): found for p in TEST_FILES if (found := forbidden_imports(p))}
    assert bad == {}, f"move the shared code into a helper module: {bad}"


def test_the_harness_own_tests_never_use_the_model_under_test() -> None:
    users = {}
    for path in ROOT.glob("tests/**/test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                used = MODEL_UNDER_TEST & {a.arg for a in node.args.args}
                if used:
                    users[f"{path.name}::{node.name}"] = used
    assert users == {}, f"these belong in suites/ (they run against --model): {users}"


def test_the_import_rule_catches_what_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "test_x.py"
    sample.write_text(
        "from suites.formats.conftest import x\nfrom .test_ref import CASES\nfrom suites.formats import data\n"
    )
    assert forbidden_imports(sample) == {
        "suites.formats.conftest",
        ".test_ref",
        ".test_ref.CASES",
    }


def test_importing_the_harness_warns_about_nothing_of_its_own() -> None:
    """Every module of the package imports without a warning raised from the package's own code
    (e.g. torch's FutureWarning for a ``@torch.no_grad()`` left on a class), which every CLI run
    and every pytest session would print.  ``__main__`` (it runs the CLI) and modules whose optional
    dependency is missing are left out."""
    code = (
        "import importlib, pkgutil, warnings, harness\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for m in pkgutil.walk_packages(harness.__path__, 'harness.'):\n"
        "        if m.name.endswith('__main__'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(m.name)\n"
        "        except ImportError:\n"
        "            pass\n"
        "print(sorted({f'{w.filename}:{w.lineno}: {w.message}' for w in caught if '/harness/' in w.filename}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out


def internal_citations(source: str) -> list[str]:
    """Docstrings and comments of ``source`` that cite an internal document (``INTERNAL_CITATION``)."""
    texts = [
        ast.get_docstring(node) or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    texts += [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return [m.group(0) for text in texts for m in INTERNAL_CITATION.finditer(text)]


def test_docstrings_cite_public_sources_not_internal_documents() -> None:
    """The package's docstrings and comments say what the code does and cite public sources (the OCP
    MX spec, QeRL, lm-eval, torchao files), never the design contract, an issue number or the
    experiment's notes, which a maintainer of the package does not have."""
    bad = {
        p.relative_to(ROOT).as_posix(): found
        for p in sorted(ROOT.glob("harness/**/*.py"))
        if (found := internal_citations(p.read_text()))
    }
    assert bad == {}, f"say what the code does, cite a public source: {bad}"


def test_the_citation_rule_catches_what_it_forbids() -> None:
    sample = (
        '"""Loss attribution (design §5)."""\n'
        "X = 1  # see issue 15\n"
        "def f():\n"
        '    """The experiment\'s §13.3 framework; OCP MX v1.0 §6.3 is fine."""\n'
        'MSG = "design §7 in a plain string is not a docstring"\n'
    )
    assert internal_citations(sample) == ["(design", "experiment's §", "issue 1"]  # docstrings, then comments


def test_the_layout_page_lists_every_module_of_the_package() -> None:
    """docs/layout.md's module table is generated from the package (``python ci/layout.py``): it
    names exactly the package's modules, so a new or removed module shows."""
    spec = importlib.util.spec_from_file_location("ci_layout", ROOT / "ci" / "layout.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = (ROOT / "docs" / "layout.md").read_text()
    listed = set(re.findall(r"^\| `(harness(?:\.\w+)*)` \|", page, re.M))
    found = set(generator.modules())
    lacks, removed = sorted(found - listed), sorted(listed - found)
    assert not lacks and not removed, f"run `python ci/layout.py`: docs/layout.md lacks {lacks}, lists {removed}"
