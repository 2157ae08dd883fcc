"""The shape of the package: line counts of the doors, the longest functions, import cycles,
where the error policy lives. Prints one table; used for the redesign's before/after.

    python experiments/layout/measure.py [--root DIR]   # DIR: a checkout (default: this one)
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

DOORS = ("train", "predict", "export", "phantom", "preprocess", "report", "node")


def modules(root: Path) -> dict[str, Path]:
    pkg = root / "lung_cls"
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def functions(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append((node.name, node.end_lineno - node.lineno + 1))
    return found


def door_path(root: Path, name: str) -> Path | None:
    for candidate in (root / "lung_cls" / f"{name}.py", root / "lung_cls" / name / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    root = parser.parse_args().root.resolve()
    mods = modules(root)
    trees = {m: ast.parse(p.read_text()) for m, p in mods.items()}
    print(f"checkout: {root}")
    print(
        f"modules: {len(mods)}, lines: {sum(len(p.read_text().splitlines()) for p in mods.values())}"
    )
    print("doors (lines):")
    for name in DOORS:
        path = door_path(root, name)
        if path is not None:
            print(f"  {path.relative_to(root)}: {len(path.read_text().splitlines())}")
    longest = sorted(((n, m, f) for m, t in trees.items() for f, n in functions(t)), reverse=True)[
        :8
    ]
    print("longest functions (lines):")
    for n, m, f in longest:
        print(f"  {n:4d}  {m}.{f}")
    print(
        f"functions over 120 lines: {sum(1 for t in trees.values() for _, n in functions(t) if n > 120)}"
    )
    reads = sum(
        1
        for t in trees.values()
        for node in ast.walk(t)
        if isinstance(node, ast.Constant) and node.value == "HYDRA_FULL_ERROR"
    )
    exits = sum(
        1
        for t in trees.values()
        for node in ast.walk(t)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "exit")
            or (isinstance(node.func, ast.Name) and node.func.id == "SystemExit")
        )
    )
    print(f"places reading HYDRA_FULL_ERROR: {reads}; places setting an exit code: {exits}")


if __name__ == "__main__":
    main()
