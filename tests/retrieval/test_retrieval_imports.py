"""No import circles in :mod:`retrieval`: a static check of the import graph and fresh-interpreter imports.

- static: every ``import`` of a ``retrieval`` module inside the package is an edge; the edges that
  run at import time (module level, not under ``if TYPE_CHECKING``) must form a DAG, and the
  class module imports the functional one, never the reverse;
- dynamic: each module is imported first, alone, in a fresh interpreter with the package's
  ``__init__`` bypassed, so a module cannot lean on the order in which ``robust_ranking/retrieval/__init__.py``
  happens to import things (``python -c "import retrieval.<module>"`` runs that ``__init__`` first,
  whatever the module: one fresh ``import retrieval`` covers that path).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from run_helpers import REPO

PKG = "robust_ranking.retrieval"
PACKAGE = REPO / "robust_ranking" / "retrieval"
MODULES = sorted(f"{PKG}.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")

# Function-level (lazy) imports that point back up the graph, each with its reason. They never run
# at import time, so they cannot form an import circle; they are listed so that none slips in.
LAZY_BACK_EDGES: set[tuple[str, str]] = {
    # evaluate_hashing ranks large databases through a HammingIndex, whose module imports
    # hashing_metrics (pack_codes) at import time.
    ("robust_ranking.retrieval.hashing_metrics", "robust_ranking.retrieval.hamming_index"),
}


def _module_name(path: Path) -> str:
    return PKG if path.stem == "__init__" else f"{PKG}.{path.stem}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported retrieval module, at import time?)`` for every import statement of ``path``."""
    found: list[tuple[str, bool]] = []
    package_modules = set(MODULES)

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:  # relative: resolve against the package
                base = PKG + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            # `from retrieval import metrics` imports a module; `from retrieval.x import f` imports x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in package_modules else base for a in node.names]
        return [n for n in names if n == PKG or n.startswith(PKG + ".")]

    def visit(node: ast.AST, import_time: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, import_time) for t in targets(child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), import_time)
            else:
                visit(child, import_time)

    visit(ast.parse(path.read_text()), True)
    return found


def _graph() -> dict[str, set[tuple[str, bool]]]:
    return {_module_name(p): {(t, at) for t, at in _imports(p) if t != _module_name(p)} for p in PACKAGE.glob("*.py")}


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None and (cycle := dfs(node)):
            return cycle
    return None


def test_import_time_graph_is_acyclic() -> None:
    graph = _graph()
    edges = {src: {dst for dst, at in targets if at} for src, targets in graph.items()}
    # a module importing the package itself would run __init__, which imports every module
    assert not {src for src, dst in edges.items() if PKG in dst and src != PKG}
    assert _find_cycle(edges) is None, f"import circle: {' -> '.join(_find_cycle(edges) or [])}"


def test_no_back_edges_even_lazily() -> None:
    """Counting function-level imports too, the only edges that close a circle are the listed ones."""
    graph = _graph()
    edges = {src: {dst for dst, _ in targets} for src, targets in graph.items()}
    for src, dst in LAZY_BACK_EDGES:
        assert (dst, False) in graph[src] and (dst, True) not in graph[src], f"{src} -> {dst} must stay lazy"
        edges[src].discard(dst)
    assert _find_cycle(edges) is None, f"import circle: {' -> '.join(_find_cycle(edges) or [])}"


def test_directions() -> None:
    graph = _graph()
    runtime = {src: {dst for dst, at in targets if at} for src, targets in graph.items()}
    assert not {dst for dst, _ in graph["robust_ranking.retrieval.average_precision"]}, "the functional AP module imports no retrieval module"
    assert "robust_ranking.retrieval.metrics" in runtime["robust_ranking.retrieval.retrieval_metrics"]
    assert "robust_ranking.retrieval.retrieval_metrics" not in runtime["robust_ranking.retrieval.metrics"]
    assert "robust_ranking.retrieval.average_precision" in runtime["robust_ranking.retrieval.metrics"]
    assert "robust_ranking.retrieval.average_precision" in runtime["robust_ranking.retrieval.topk_metrics"]


_BYPASS_INIT = """
import sys, types
import robust_ranking
pkg = types.ModuleType("robust_ranking.retrieval")
pkg.__path__ = [{path!r}]
sys.modules["robust_ranking.retrieval"] = pkg
"""


def _fresh_import(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Imported first, alone, with ``robust_ranking/retrieval/__init__.py`` bypassed (a circle fails here)."""
    _fresh_import(_BYPASS_INIT.format(path=str(PACKAGE)) + f"import importlib; importlib.import_module({module!r})")


def test_package_reexports_flat() -> None:
    _fresh_import("import robust_ranking.retrieval as retrieval; "
                  "missing = [n for n in retrieval.__all__ if not hasattr(retrieval, n)]; "
                  "assert not missing, missing; assert len(set(retrieval.__all__)) == len(retrieval.__all__)")
