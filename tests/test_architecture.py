"""The shape of the code (../shared/DESIGN.md): no import cycles, nothing imports the command line, protobuf
messages are touched by the serde boundary only, modules stay small.

The import graph is built from the sources with ``ast`` (imports inside functions included), over every module
of ``edgeft/``, ``server/`` (installed as ``edgeft.server``) and ``client/`` (as ``edgeft.client``).
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"edgeft": REPO / "edgeft", "edgeft.server": REPO / "server", "edgeft.client": REPO / "client"}
GENERATED = "edgeft.v1"  # protoc's output (scripts/gen_protos.py), never edited by hand
NOT_MODULES = (REPO / "edgeft" / "testing" / "no_torch",)  # stand-ins for torch & co. put on agents' PYTHONPATH
# the serde boundary (the edgeft.wire package); the servicer may name what gRPC registration needs (today: nothing)
PROTOBUF_USERS = ("edgeft.wire", "edgeft.server.servicer")
MAX_LINES = 400


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if any(path.is_relative_to(skip) for skip in NOT_MODULES) or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if prefix == "edgeft" and parts[:1] in (["server"], ["client"]):  # not a folder of edgeft/ anyway
                continue
            modules[".".join([prefix, *parts])] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies in (``a.b.attr`` -> ``a.b``); None outside edgeft."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


@lru_cache(maxsize=1)
def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported edgeft module: first line that imports it}} for every module."""
    modules = _module_files()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` imports the module pkg.mod; `from mod import attr` the module mod
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.setdefault(resolved, node.lineno)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a module path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth: the length of an import chain (tens)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_a_cycle(graph, set(component), component[0]) for component in components]


def _a_cycle(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component (breadth-first, so a short one)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in members:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_every_package_and_imports_inside_functions():
    graph = import_graph()
    assert {"edgeft.wire", "edgeft.server.servicer", "edgeft.client.agent", "edgeft.cli"} <= set(graph)
    assert "edgeft.server.servicer" in graph["edgeft.commands.coordinator"]  # imported inside a function


def test_a_cycle_is_reported_as_the_path_that_closes_it():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7, "d": 1}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _describe(graph, ["a", "b", "c", "a"]) == "a (line 3) -> b (line 5) -> c (line 7) -> a"


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_nothing_imports_the_command_line():
    importers = {m: line for m, edges in import_graph().items() for t, line in edges.items()
                 if _within(t, "edgeft.cli")}
    assert not importers, f"edgeft.cli is the entry point; imported by {importers}"


def test_only_the_serde_boundary_touches_protobuf_messages():
    users = {m: line for m, edges in import_graph().items() for t, line in edges.items()
             if _within(t, GENERATED) and not _within(m, GENERATED)}
    assert users and all(m.startswith("edgeft.wire.") for m in users)  # the graph does see the boundary
    outside = {m: line for m, line in users.items() if not any(_within(m, allowed) for allowed in PROTOBUF_USERS)}
    assert not outside, f"edgeft.v1 imported outside {', '.join(PROTOBUF_USERS)}: {outside}"


def test_modules_stay_small():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _module_files().items() if not _within(m, GENERATED)}
    over = {m: n for m, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
