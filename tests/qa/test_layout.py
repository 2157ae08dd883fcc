"""The QA package's shape: no import cycle among its modules (function-level imports included),
and the two doors never import each other (each reaches the library only through lung_cls.qa)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "lung_cls"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``lung_cls`` module that ``path`` imports anywhere: top level, in functions, under
    TYPE_CHECKING. ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == "lung_cls"}


def graph(paths: list[Path]) -> dict[str, set[str]]:
    names = {module_name(p): p for p in paths}
    return {name: imports_of(p) & set(names) - {name} for name, p in names.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def qa_files() -> list[Path]:
    own = sorted((PACKAGE / "qa").glob("*.py"))  # lung_cls.qa.node is a sibling's; not here
    return own + [PACKAGE / "predict.py", PACKAGE / "export.py", PACKAGE / "data" / "declared.py"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_the_qa_modules():
    edges = graph(qa_files())
    assert "lung_cls.qa.decide" in edges and "lung_cls.qa.batch" in edges
    assert edges["lung_cls.qa.batch"] >= {"lung_cls.qa.decide", "lung_cls.qa.inputs"}
    assert find_cycle(edges) is None, find_cycle(edges)


def test_the_doors_do_not_import_each_other_and_the_library_no_door():
    edges = graph(qa_files())
    assert "lung_cls.export" not in edges["lung_cls.predict"]
    assert "lung_cls.predict" not in edges["lung_cls.export"]
    for name, targets in edges.items():
        if name.startswith("lung_cls.qa"):
            assert not targets & {"lung_cls.predict", "lung_cls.export"}, name
            # Nothing in the package imports the package itself: its __init__ only re-exports.
            assert "lung_cls.qa" not in targets, name
