"""The package's shape: no import cycles, one definition of each shared name, light doors.

Read from the source with ``ast`` (nothing is imported), so a check covers every module,
function-level imports included, and names the file and line that break it.

Two modules are being rewritten by other work in progress of issue #12 (``predict.py`` and
``export.py`` become ``lung_cls/qa/``, ``report.py`` becomes ``lung_cls/report/``). Where a check
fails only because of them, that one known failure is a strict xfail of its own: it turns into a
failure the moment the rewrite lands, so the exception is removed then rather than forgotten.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "lung_cls"
#: Modules that other helpers of issue #12 are rewriting right now (see the module docstring).
#: The doors: modules a user runs. Library code never imports one (the dependency points inwards).
DOORS = {"lung_cls.train", "lung_cls.predict", "lung_cls.export", "lung_cls.phantom",
         "lung_cls.preprocess", "lung_cls.report.__main__", "lung_cls.node.__main__",
         "lung_cls.node"}  # fmt: skip


# --------------------------------------------------------------------------- reading the source
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: ``if TYPE_CHECKING:`` bodies are left out (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> dict[str, int]:
    """The lung_cls modules ``module`` imports (top level and inside functions) -> first line."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: dict[str, int] = {}
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from lung_cls.x import y` imports the module lung_cls.x.y when there is one
                targets.append(sub if sub in MODULES else base)
        for target in targets:
            if target == "lung_cls" or target.startswith("lung_cls."):
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    found.setdefault(target, node.lineno)
    return found


GRAPH: dict[str, dict[str, int]] = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_path(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    """One concrete cycle through a component, with the importing lines: for the message."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        nxt = next(w for w in sorted(graph[path[-1]]) if w in members)
        if nxt in seen:
            loop = path[path.index(nxt) :] + [nxt]
            return (
                " -> ".join(
                    f"{a} (line {graph[a][b]})" for a, b in zip(loop, loop[1:], strict=False)
                )
                + f" -> {nxt}"
            )
        path.append(nxt)
        seen.add(nxt)


# --------------------------------------------------------------------------- import cycles
def test_the_graph_sees_function_level_and_relative_imports():
    """Guards the reader itself: a graph without edges would have no cycles either."""
    assert "lung_cls.data.datamodule" in GRAPH["lung_cls.training"]  # imported inside train()
    assert "lung_cls.runs" in GRAPH["lung_cls.evaluation.sweep_callback"]  # inside a method
    assert "lung_cls.errors" in GRAPH["lung_cls.utils.hydra"]
    assert "lung_cls.evaluation.cam" not in GRAPH["lung_cls.evaluation"]  # TYPE_CHECKING only
    fake = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(fake) == [["a", "b", "c"]]
    assert "a (line 1) -> b (line 2) -> c (line 3) -> a" == _cycle_path(fake, ["a", "b", "c"])


def test_no_import_cycle_between_lung_cls_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(_cycle_path(GRAPH, c) for c in cycles)


def test_no_library_module_imports_a_door():
    """predict.py and export.py used to import each other; a door is a leaf of the graph."""
    bad = [
        f"{module} imports {door}"
        for module, targets in GRAPH.items()
        for door in sorted(set(targets) & DOORS)
        # a package may re-export its own door's main (lung_cls.report.main)
        if module not in DOORS and not door.startswith(module + ".")
    ]
    assert not bad, bad
    assert not set(GRAPH["lung_cls.predict"]) & {"lung_cls.export"}
    assert not set(GRAPH["lung_cls.export"]) & {"lung_cls.predict"}


# --------------------------------------------------------------------------- one definition
def _trees(exclude: set[str] = frozenset()) -> dict[str, ast.AST]:
    return {m: ast.parse(p.read_text()) for m, p in MODULES.items() if m not in exclude}


def _assigned_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if isinstance(t, ast.Name):
                names.add(t.id)
    return names


def test_class_names_are_defined_once():
    bad = []
    for module, tree in _trees().items():
        if module == "lung_cls.labels":
            continue
        if {"CLASS_NAMES", "_CLASS_NAMES"} & _assigned_names(tree):
            bad.append(f"{module}: assigns CLASS_NAMES (import it from lung_cls.labels)")
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and [getattr(e, "value", None) for e in node.elts] == [
                "ventilation",
                "perfusion",
            ]:
                bad.append(f"{module}:{node.lineno}: a copy of CLASS_NAMES")
    assert not bad, bad


ERROR_CLASSES = {"UserError", "DataError", "DataSetupError", "ConfigError",
                 "WeightsNotFoundError", "ParityError", "LungClsError"}  # fmt: skip


def _error_policy_breaches(modules: set[str] | None = None) -> list[str]:
    """Error classes defined outside errors.py, HYDRA_FULL_ERROR read and exit codes set outside
    errors.py (the sweep callback's exit 1 after a finished sweep is the one other place)."""
    bad = []
    for module, tree in _trees().items():
        if module == "lung_cls.errors" or (modules is not None and module not in modules):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in ERROR_CLASSES:
                bad.append(f"{module}:{node.lineno}: defines {node.name} (errors.py does)")
            if isinstance(node, ast.Constant) and node.value == "HYDRA_FULL_ERROR":
                bad.append(f"{module}:{node.lineno}: reads HYDRA_FULL_ERROR (task_wrapper does)")
            if module == "lung_cls.evaluation.sweep_callback":
                continue
            if isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "exit")
                or (isinstance(node.func, ast.Name) and node.func.id == "SystemExit")
            ):
                bad.append(f"{module}:{node.lineno}: sets an exit code (task_wrapper does)")
    return bad


def test_error_policy_lives_in_errors_py():
    bad = _error_policy_breaches()
    assert not bad, bad


# --------------------------------------------------------------------------- light imports
@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("lung_cls.errors", ("numpy", "omegaconf", "torch")),
        ("lung_cls.labels", ("numpy", "omegaconf", "torch")),
        ("lung_cls.utils.hydra", ("torch", "lightning", "lung_cls.data")),
        ("lung_cls.runs", ("torch", "lightning", "pandas")),
    ],
)
def test_light_modules_stay_light(module, heavy):
    """What every door imports first must not pull in the training stack (seconds per command)."""
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"
