"""The import graph of a source tree, read with `ast` (nothing in it is imported or run).

    python -m testbed.imports [PATH]

prints, for the tree at PATH (default: the current directory), every edge between packages with
how many module-to-module imports make it (`publisher -> keyrelay.core  41`), then every import cycle
between modules and between packages. A package is a top-level directory with an `__init__.py`;
`keyrelay.core` counts as a package of its own, apart from the rest of `keyrelay` (the CLI).

Imports inside functions count (they are dependencies, run later); imports under `if TYPE_CHECKING:`
do not (they never run: annotations only). tests/test_architecture.py checks the layering with it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SUBPACKAGES", "Import", "component", "cycles", "modules", "package_edges", "read_imports"]

# Subpackages that are layers of their own, not part of their parent's.
SUBPACKAGES = ("keyrelay.core",)

_SKIPPED_DIRS = {"build", "dist", "node_modules"}


@dataclass(frozen=True, slots=True)
class Import:
    """One import of a module of the tree by another."""

    source: str  # the importing module, dotted
    target: str  # the imported module of the tree, dotted
    path: Path  # the importing file
    line: int
    typing_only: bool  # under `if TYPE_CHECKING:`: never executed


def modules(root: Path) -> dict[str, Path]:
    """Every module of the tree's top-level packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in sorted(root.iterdir()):
        if package.name.startswith(".") or package.name in _SKIPPED_DIRS or not (package / "__init__.py").is_file():
            continue
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(not (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                continue  # a directory that is no package (data, fixtures)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def component(module: str) -> str:
    """The package a module belongs to: its top-level package, or one of SUBPACKAGES."""
    for sub in SUBPACKAGES:
        if module == sub or module.startswith(sub + "."):
            return sub
    return module.partition(".")[0]


def read_imports(root: Path) -> list[Import]:
    """Every import, anywhere in each module of the tree, of another module of the tree."""
    known = modules(root)
    found: list[Import] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, typing_only in _walk(tree, typing_only=False):
            for target in _targets(node, package, known):
                if target != name:
                    found.append(Import(name, target, path, node.lineno, typing_only))
    return found


def _walk(node: ast.AST, *, typing_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, typing_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), typing_only=True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), typing_only=typing_only)
        else:
            yield from _walk(child, typing_only=typing_only)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: Mapping[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            target = _longest_known(alias.name, known)
            if target is not None:
                yield target
        return
    if node.level:
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    for alias in node.names:
        target = _longest_known(f"{module}.{alias.name}", known) or _longest_known(module, known)
        if target is not None:
            yield target


def _longest_known(dotted: str, known: Mapping[str, Path]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def package_edges(imports: Iterable[Import]) -> Counter[tuple[str, str]]:
    """Edges between packages, each with how many (importing module, imported module) pairs make it."""
    pairs = {(i.source, i.target) for i in imports}
    return Counter((component(s), component(t)) for s, t in pairs if component(s) != component(t))


def cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The graph's cycles: each strongly connected group of two or more nodes, sorted (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(groups)


def report(root: Path) -> str:
    """The package edges and the cycles of the tree at `root`, as printed by `python -m testbed.imports`."""
    found = [i for i in read_imports(root) if not i.typing_only]
    edges = package_edges(found)
    lines = [f"package imports in {root} (count: importing module -> imported module pairs)"]
    width = max((len(f"{s} -> {t}") for s, t in edges), default=0)
    lines += [f"  {f'{s} -> {t}':<{width}}  {n}" for (s, t), n in sorted(edges.items())]
    module_cycles = cycles((i.source, i.target) for i in found)
    package_cycles = cycles(edges)
    lines.append("module cycles:" if module_cycles else "module cycles: none")
    lines += ["  " + " <-> ".join(group) for group in module_cycles]
    lines.append("package cycles:" if package_cycles else "package cycles: none")
    lines += ["  " + " <-> ".join(group) for group in package_cycles]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the import graph of the tree given (default: the current directory)."""
    parser = argparse.ArgumentParser(prog="python -m testbed.imports", description=main.__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=Path("."), help="root of the source tree")
    args = parser.parse_args(argv)
    print(report(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
