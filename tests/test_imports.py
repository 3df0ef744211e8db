"""The package's import structure, read from the source (nothing is imported).

Two rules: no module of covalent_lot (strategies/ included) imports another
that imports it back, directly or around a circle, counting imports inside
functions too (they run later, but a circle still means neither module can be
understood, tested or moved without the other); and only _covalent.py imports
Covalent, so a change in Covalent's private layout is mended in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "covalent_lot"
# strategies/ is installed as covalent_lot.strategies
SOURCES = {PACKAGE: ROOT / "covalent_lot", f"{PACKAGE}.strategies": ROOT / "strategies"}
COVALENT_GATE = f"{PACKAGE}._covalent"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, as absolute dotted names."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from . import _cache`` imports a module, ``from .x import f`` a name of
            # one: import_graph keeps the longest prefix that is a module.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        for target in imported_names(name, path):
            # A name inside a module is that module; ``covalent_lot`` itself is __init__.py.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    on_path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert {f"{PACKAGE}.cli", f"{PACKAGE}._engine", f"{PACKAGE}.strategies.s3"} <= set(graph)
    assert f"{PACKAGE}._engine" in graph[f"{PACKAGE}._strategy"]


def test_finds_a_circle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_only_the_gate_imports_covalent():
    importers = sorted(
        name for name, path in modules().items()
        if any(n == "covalent" or n.startswith("covalent.") for n in imported_names(name, path))
    )
    assert importers == [COVALENT_GATE]
