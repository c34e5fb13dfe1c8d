"""No module of trustmesh imports itself back, directly or through others, not even for
type checking only (docs/architecture.md: imports point downward)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The trustmesh modules a file imports (``from package import module`` included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def test_there_is_no_import_cycle() -> None:
    files = {module_name(p): p for p in (SRC / "trustmesh").rglob("*.py")}
    modules = set(files)
    graph = {name: imported(path, modules) - {name} for name, path in files.items()}
    # A package's __init__ may name its own modules; that is not a cycle through code.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_a_cycle_is_found() -> None:
    with pytest.raises(CycleError):
        tuple(TopologicalSorter({"a": {"b"}, "b": {"a"}}).static_order())
