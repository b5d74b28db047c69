"""The package's layering, read from its source: no import cycle between modules at module level,
passes that import neither the backend nor the API, and functions short enough to read."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "shiftc"
MAX_FUNCTION_LINES = 80
# the declarative parser: one add_argument per flag, read as a table
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(path: pathlib.Path, module_level_only: bool) -> set[str]:
    """shiftc modules imported by ``path`` (``from . import x`` counts as the module x when it is one)."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # imports under `if TYPE_CHECKING:` do not run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("shiftc")}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module) if node.level else (node.module or "")
            if not target.startswith("shiftc"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / sub.replace(".", "/") / "__init__.py").exists() else target)
    return out


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_no_module_level_import_cycle():
    graph = {_module_name(p): _imports(p, module_level_only=True) for p in _sources()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            # a package's __init__ runs before its submodules: an edge to a parent package is no cycle of its own
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n in graph and n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_passes_import_neither_the_backend_nor_the_api():
    forbidden = ("shiftc.backend", "shiftc.api", "shiftc.cli", "shiftc.benchmarking", "shiftc.demo")
    bad = {}
    for p in (PKG / "passes").rglob("*.py"):
        hits = sorted(m for m in _imports(p, module_level_only=False) if m.startswith(forbidden))
        if hits:
            bad[str(p.relative_to(PKG))] = hits
    assert not bad, f"passes importing the backend or the API (give them callables instead): {bad}"


def test_the_checks_see_imports():
    """The two checks above would pass on a reader that sees nothing: make sure it sees these."""
    assert "shiftc.passes.recipe" in _imports(PKG / "passes" / "compress.py", module_level_only=True)
    assert "shiftc.backend.compile" in _imports(PKG / "api.py", module_level_only=False)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PKG)))
def test_functions_fit_on_a_screen(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and (path.name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                long.append(f"{node.name} ({n} lines)")
    assert not long, f"{path.relative_to(PKG)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
