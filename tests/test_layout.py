"""The test suite's own layout (issue 22, part 10): test modules live in folders that mirror
featcal's packages, shared builders in the ``tests.fixtures`` package and pytest fixtures in
conftest.py, and no test module imports another (the imports are read with ``ast``, so an
import inside a function counts too)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FOLDERS = {"fixtures", "io", "backbone", "tasks", "suites", "merge", "calibration", "report", "run"}


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every dotted name an ``import`` / ``from ... import`` statement may load: the module
    itself and, for ``from m import a``, also ``m.a`` (``a`` may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
            out |= {f"{base}.{a.name}" if node.module else base + a.name for a in node.names}
    return out


def test_no_test_module_imports_another():
    modules = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)
    test_names = {p.stem for p in modules if p.stem.startswith("test_")} | {"conftest"}
    assert len(test_names) > 50, test_names  # the walk found the suite
    offenders = []
    for path in modules:
        for name in _imported_modules(ast.parse(path.read_text(), filename=str(path))):
            parts = name.lstrip(".").split(".")
            if any(part in test_names for part in parts):
                offenders.append(f"{path.relative_to(TESTS.parent)}: {name}")
    assert offenders == [], "move what is shared into tests/fixtures/ (pytest fixtures: conftest.py): " + ", ".join(offenders)


def test_test_modules_live_in_folders_that_mirror_the_package():
    top = sorted(p.name for p in TESTS.glob("*.py"))
    # test_layers.py checks the featcal package as a whole (its import graph), test_layout.py this folder
    assert top == ["__init__.py", "conftest.py", "test_layers.py", "test_layout.py"], top
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == FOLDERS, folders
    for folder in folders:
        assert (TESTS / folder / "__init__.py").is_file(), folder  # same-named modules stay apart
    assert not list((TESTS / "fixtures").glob("test_*.py")), "tests/fixtures/ holds builders, not tests"
    # every test module is a test_*.py in one of the folders (none hidden under another name)
    for path in TESTS.rglob("*.py"):
        rel = path.relative_to(TESTS)
        if len(rel.parts) == 2 and rel.parts[0] != "fixtures" and rel.name != "__init__.py":
            assert rel.name.startswith("test_") or rel.name == "conftest.py", rel
