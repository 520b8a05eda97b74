"""The import graph of ``featcal/`` (every import statement, function-level ones included,
read with ``ast``, nothing imported): the model layer (``featcal/backbone/``) and the IO
layer (``featcal/io/``) import nothing above them, and no featcal modules import each other
in a circle."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featcal"

#: the layers the model and IO layers sit below
ABOVE = ("featcal.tasks", "featcal.merge", "featcal.calibration", "featcal.suites", "featcal.report", "featcal.run")
LOW_LAYERS = ("featcal.backbone", "featcal.io")

# Known exceptions (none left after the redesign; a new one must say why here, and the test
# fails on an exception that no longer applies, so none outlives its reason).
KNOWN_UPWARD: set[str] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(module: str, path: Path) -> set[str]:
    """Every ``featcal...`` name ``module`` imports (``from a import b`` gives ``a.b``: module
    ``a.b`` or, for a name defined in ``a``, module ``a``), the relative ones resolved, at any
    depth of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    # imports under ``if TYPE_CHECKING:`` never run: annotations only, not an arrow
    type_only = {id(n) for guard in ast.walk(tree) if isinstance(guard, ast.If) and _is_type_checking(guard.test)
                 for stmt in guard.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.update(f"{origin}.{a.name}" for a in node.names)
    return {n for n in names if n == "featcal" or n.startswith("featcal.")}


def _graph() -> dict[str, set[str]]:
    """module -> the featcal modules it imports (a name resolves to its longest module prefix)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(n) for n in _imported(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _upward(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    return {m: sorted(t for t in targets if _is_under(t, ABOVE))
            for m, targets in graph.items() if _is_under(m, LOW_LAYERS) and any(_is_under(t, ABOVE) for t in targets)}


def test_the_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: an import inside a function and a relative import both count; one
    under ``if TYPE_CHECKING:`` does not."""
    pkg = tmp_path / "featcal"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("def f():\n    from featcal.merge import b\n")
    (pkg / "io" / "c.py").write_text("from . import a\n")
    (pkg / "merge.py").write_text("import featcal.io.c\n")
    (pkg / "io" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from featcal import merge\nelse:\n    import featcal.io.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph = _graph()
    assert graph["featcal.io.a"] == {"featcal.merge"}
    assert graph["featcal.io.c"] == {"featcal.io.a"}
    assert graph["featcal.io.d"] == {"featcal.io.a"}  # the TYPE_CHECKING import never runs; its else branch does
    assert _upward(graph) == {"featcal.io.a": ["featcal.merge"]}
    assert _cycles(graph) == [frozenset({"featcal.io.a", "featcal.io.c", "featcal.merge"})]


def test_model_and_io_layers_import_nothing_above_them():
    upward = _upward(_graph())
    unexpected = {m: t for m, t in upward.items() if m not in KNOWN_UPWARD}
    assert not unexpected, f"featcal/backbone and featcal/io must not import {ABOVE}: {unexpected}"
    stale = KNOWN_UPWARD - set(upward)
    assert not stale, f"no longer importing upward (remove from KNOWN_UPWARD): {sorted(stale)}"


def test_no_import_cycles():
    cycles = _cycles(_graph())
    unexpected = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not unexpected, f"featcal modules importing each other in a circle: {unexpected}"
    stale = KNOWN_CYCLES - set(cycles)
    assert not stale, f"no longer a circle (remove from KNOWN_CYCLES): {[sorted(c) for c in stale]}"


def test_the_readme_layout_tour_names_every_package_and_module():
    """README's "Layout" section matches the tree: every featcal subpackage (``featcal/<x>/``) and
    every top-level module (``<x>.py``) is named there, and nothing it names as ``featcal/<x>/``
    is missing from the tree."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("\n## Layout\n"):]
    tour = tour[: tour.find("\n## ", 5)] if tour.find("\n## ", 5) > 0 else tour
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    missing = sorted(f"featcal/{p}/" for p in packages if f"featcal/{p}/" not in tour)
    missing += sorted(m for m in modules if m not in tour)
    assert not missing, f"README's Layout section does not name: {missing}"
    import re

    named = set(re.findall(r"featcal/([a-z_]+)/", tour))
    assert named <= packages, f"README's Layout names packages that do not exist: {sorted(named - packages)}"
