"""The package's import graph, read from the source: every import statement counts, at module level,
inside functions and under ``if TYPE_CHECKING``, so that what a test says of the graph holds for
every path the code can take."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "branchy_tee"


@dataclass
class Graph:
    src: Path
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> branchy_tee modules it imports
    external: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level names of the others

    def reachable(self, entries: tuple[str, ...] | list[str]) -> set[str]:
        """The modules importing ``entries`` can execute: their imports at any depth, and the
        ``__init__`` of every package on the way (Python runs those first)."""
        seen: set[str] = set()
        todo = list(entries)
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            parent = m.rpartition(".")[0]
            if parent:
                todo.append(parent)
            todo.extend(self.edges[m])
        return seen

    def cycles(self) -> list[list[str]]:
        """Every strongly connected component of more than one module (Tarjan), and self-imports."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        out: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in self.edges[v]:
                    out.append(sorted(component))

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10_000))
        try:
            for v in sorted(self.edges):
                if v not in index:
                    visit(v)
        finally:
            sys.setrecursionlimit(limit)
        return out


def module_name(src: Path, path: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_graph(src: Path) -> Graph:
    """The graph of every module under ``src/branchy_tee``."""
    g = Graph(src)
    for path in sorted((src / PACKAGE).rglob("*.py")):
        g.files[module_name(src, path)] = path
    for module, path in g.files.items():
        ours, theirs = set(), set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for name in imported_names(ast.parse(path.read_bytes(), str(path)), package):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                ours.add(_resolve(g, name, path))
            else:
                theirs.add(name.split(".")[0])
        g.edges[module] = ours
        g.external[module] = theirs
    return g


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module an AST imports; ``from X import y`` gives ``X.y`` (resolved later: a module or a
    name in X). Relative imports are resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _resolve(g: Graph, name: str, where: Path) -> str:
    """``X.y`` -> ``X.y`` if that is a module, else ``X`` (y is a name defined in X)."""
    if name in g.files:
        return name
    base = name.rpartition(".")[0]
    if base in g.files:
        return base
    raise AssertionError(f"{where}: imports {name}, which is no module of {PACKAGE}")
