"""The library's import graph, read from the source: one-way dependencies, no circles, no upward imports.

Every import counts, at module top or inside a function, deferred or not (the restructure removed three circles
that hid behind deferred imports: config <-> presets, data <-> verl_data, losses <-> loss_chunked).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBRARY = REPO_ROOT / "pcsd_core"
FORBIDDEN_TOP_LEVEL = {"metaflow", "mlflow", "steps", "flows", "dashboards", "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement in `path` names: `a.b` and, for `from a.b import c`, `a.b.c` too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in LIBRARY.rglob("*.py")}
    return {name: {imported for imported in imported_names(path) if imported in modules and imported != name}
            for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            groups.append(group)

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_module_of_the_library_imports_one_that_imports_it_back():
    graph = library_graph()
    assert len(graph) > 30, "the walk found too few modules to mean anything"
    circles = [sorted(group) for group in strongly_connected(graph) if len(group) > 1]
    assert circles == []


def test_the_cycle_finder_finds_a_circle():
    assert [sorted(g) for g in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(g) > 1] \
        == [["a", "b", "c"]]


def test_the_library_imports_nothing_above_it_nor_metaflow_or_mlflow():
    upward = {module_name(path): sorted(name for name in imported_names(path)
                                        if name.split(".")[0] in FORBIDDEN_TOP_LEVEL)
              for path in LIBRARY.rglob("*.py")}
    assert {module: names for module, names in upward.items() if names} == {}


def test_the_library_names_no_flow_step_or_program_of_the_layers_above():
    """Knowledge leaks upward without imports too: a message that names `flows/pcsd_flow.py` or a step file."""
    leaks = {}
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text()
        found = [needle for needle in ("flows/", "steps/", "from steps", "pcsd_flow", "--data-path", "DATA_PATH",
                                       "ROLLOUT_NUM_GPUS", "preprocess step") if needle in text]
        if found:
            leaks[module_name(path)] = found
    assert leaks == {}
