"""The ``streamer`` package has no import circles between its modules.

Every ``import`` counts, wherever it is written: at the top, under ``TYPE_CHECKING`` and inside
functions (a lazy import only hides a circle; it does not remove it). Read from the source with
:mod:`ast`, so nothing is imported and no optional dependency is needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "streamer"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """``{"streamer.server.listen": path, "streamer.server": .../__init__.py, ...}``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports, ``from X import Y`` giving both ``X`` and ``X.Y``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding ``module``
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing ``name`` loads last (its longest prefix we have), if any."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules it imports}``, our own modules only, without parent-package edges."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {_resolve(n, modules) for n in _imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = {t for t in targets if t is not None and t != module and not module.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in the strongly connected group {sorted(group)}")


def test_the_package_has_no_import_cycles() -> None:
    modules = module_files()
    assert "streamer.cli" in modules and "streamer.server.listen" in modules  # the walk sees the package
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles (a lazy or TYPE_CHECKING import counts too):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles
    )


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"a": "from . import b", "b": "from .c import x", "c": "def f():\n    import p.a"},
         ["p.a", "p.b", "p.c", "p.a"]),
        ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import B", "b": "import p.a"},
         ["p.a", "p.b", "p.a"]),
        ({"a": "import p.b", "b": "import os"}, None),
    ],
)
def test_the_walk_finds_lazy_relative_and_type_checking_cycles(
    tmp_path: Path, sources: dict[str, str], expected: list[str] | None
) -> None:
    package = tmp_path / "p"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in sources.items():
        (package / f"{name}.py").write_text(text + "\n")
    cycles = find_cycles(import_graph(module_files(package)))
    assert cycles == ([expected] if expected else [])
