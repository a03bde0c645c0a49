"""Print the import graph between fvlm's modules: cycles, upward imports and function-local imports.

Run from the repository root: ``python tools/imports.py`` (``--edges`` also lists every edge).
Only imports that run when a module is imported count as edges (module level, outside
``if TYPE_CHECKING:``); imports inside functions are listed separately, since each must either
break a real cycle or defer a heavy import. Exits 1 when the graph has a cycle, an upward import
(module level or function-local; see :data:`LAYERS`) or a production module importing a test fixture.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fvlm"

#: Layers from the bottom up: a module may import its own layer and the layers below it.
LAYERS = [
    ["fvlm.errors", "fvlm.console", "fvlm.types", "fvlm.budget", "fvlm.indexing", "fvlm.profiling.timing"],
    ["fvlm.registry", "fvlm.processors", "fvlm.trace", "fvlm.auxiliary"],
    ["fvlm.adapters"],
    ["fvlm.metrics"],
    ["fvlm.context", "fvlm.selectors"],
    ["fvlm.session"],
    ["fvlm.profiling", "fvlm.testing"],
    ["fvlm.builtin", "fvlm.tiny_backbones", "fvlm.backbones", "fvlm.answering", "fvlm.lightning"],
    ["fvlm.commands", "fvlm.cli", "fvlm.integrations", "fvlm"],
]
#: Test fixtures (random tiny models for tests and benchmarks): no production module imports them.
FIXTURES = {"fvlm.testing"}


@dataclass
class Graph:
    edges: dict[str, set[str]] = field(default_factory=dict)
    local: dict[str, set[str]] = field(default_factory=dict)  # imports inside functions


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, here: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = here if is_package else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:  # `import fvlm.x.y` where y is an attribute
            name = name.rpartition(".")[0]
        if name.startswith("fvlm") and name != here:
            out.append(name)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def build() -> Graph:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = Graph()
    for path in paths:
        here = module_name(path)
        is_package = path.name == "__init__.py"
        graph.edges[here], graph.local[here] = set(), set()

        def visit(body, local: bool) -> None:
            for node in body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    (graph.local if local else graph.edges)[here].update(
                        _targets(node, here, is_package, modules))
                elif isinstance(node, ast.If) and _type_checking(node):
                    continue
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for inner in ast.walk(node):
                        if isinstance(inner, (ast.Import, ast.ImportFrom)):
                            graph.local[here].update(_targets(inner, here, is_package, modules))
                elif isinstance(node, ast.ClassDef):
                    visit(node.body, local)
                elif isinstance(node, (ast.If, ast.Try, ast.With)):
                    visit([n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)], local)

        visit(ast.parse(path.read_text()).body, False)
    return graph


def layer(module: str) -> int:
    best, depth = len(LAYERS) - 1, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def upward(graph: Graph) -> list[tuple[str, str]]:
    """Edges to a higher layer (a package re-exporting its own submodules is not one)."""
    return sorted((a, b) for a, targets in graph.edges.items() for b in targets
                  if layer(b) > layer(a) and not b.startswith(a + "."))


def upward_local(graph: Graph) -> list[tuple[str, str]]:
    """Function-local imports of a higher layer: a dependency the layering hides, not a deferral."""
    return sorted((a, b) for a, targets in graph.local.items() for b in targets
                  if layer(b) > layer(a) and not b.startswith(a + "."))


def fixture_imports(graph: Graph) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.edges.items() for b in targets | graph.local[a]
                  if b in FIXTURES and a not in FIXTURES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="also list every module-level edge")
    args = parser.parse_args(argv)
    graph = build()
    found_cycles, found_up, found_fix = cycles(graph.edges), upward(graph), fixture_imports(graph)
    found_hidden = upward_local(graph)
    n_edges = sum(map(len, graph.edges.values()))
    n_local = sum(map(len, graph.local.values()))
    print(f"{len(graph.edges)} modules, {n_edges} module-level edges, {n_local} function-local imports")
    print(f"cycles: {len(found_cycles)}")
    for c in found_cycles:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(found_up)}")
    for a, b in found_up:
        print(f"  {a} -> {b}")
    print(f"upward function-local imports: {len(found_hidden)}")
    for a, b in found_hidden:
        print(f"  {a} -> {b}")
    print(f"production modules importing test fixtures: {len(found_fix)}")
    for a, b in found_fix:
        print(f"  {a} -> {b}")
    print("function-local imports:")
    for a in sorted(graph.local):
        if graph.local[a]:
            print(f"  {a}: " + ", ".join(sorted(graph.local[a])))
    if args.edges:
        print("edges:")
        for a in sorted(graph.edges):
            print(f"  {a} -> " + ", ".join(sorted(graph.edges[a])))
    return 1 if found_cycles or found_up or found_hidden or found_fix else 0


if __name__ == "__main__":
    sys.exit(main())
