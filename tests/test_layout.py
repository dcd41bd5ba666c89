"""The package's rooms hold: core imports no backend or CLI, no import cycles, small modules that name their job."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "vlrouter"
def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _in_type_checking(node, parents):
            continue
        in_func, n = False, node
        while n in parents:
            n = parents[n]
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_func = True
        if isinstance(node, ast.Import):
            out += [(a.name, in_func) for a in node.names]
        elif node.module:
            mods = _modules()
            for a in node.names:  # `from vlrouter.core import engine` imports a module
                full = f"{node.module}.{a.name}"
                out.append((full if full in mods else node.module, in_func))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i, _ in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_core_imports_nothing_from_backends_cli_serve_or_demo():
    for mod, deps in _graph().items():
        if mod.startswith("vlrouter.core"):
            bad = [d for d in deps if d.split(".")[1:2] in (["backends"], ["cli"], ["serve"], ["demo"])]
            assert not bad, (mod, bad)


def test_core_does_not_even_name_backends_or_cli():
    """The issue's own check: `grep -rn "vlrouter.backends\\|vlrouter.cli" vlrouter/core` finds nothing."""
    pattern = re.compile(r"vlrouter.backends|vlrouter.cli")
    hits = [f"{p}:{n}" for p in sorted((PKG / "core").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_no_two_modules_import_each_other_directly_or_through_others():
    graph = _graph()
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    cycles = [c for c in sccs if len(c) > 1]
    assert not cycles, cycles


def test_the_package_imports_its_own_modules_at_the_top():
    """Lazy imports are for heavy third-party libraries (torch, transformers, peft, modal …), not for vlrouter's."""
    for mod, path in _modules().items():
        late = [name for name, in_func in _imports(path) if in_func and name.split(".")[0] == "vlrouter"]
        assert not late, (mod, late)


@pytest.mark.parametrize("mod", sorted(_modules()))
def test_every_module_names_its_one_job_in_its_first_docstring_line(mod):
    path = _modules()[mod]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{path}: no first docstring line"
    if mod.startswith("vlrouter.core"):
        assert len(path.read_text().splitlines()) <= 600, f"{path} is over 600 lines"


def test_readme_layout_names_every_core_module():
    """README's layout tree lists every module of core/ (a new room is documented where newcomers look)."""
    readme = (PKG.parent / "README.md").read_text()
    tree = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 3)]
    missing = [p.name for p in sorted((PKG / "core").glob("*.py"))
               if p.name != "__init__.py" and f"    {p.name} " not in tree]
    assert missing == [], f"add them to README's Layout: {missing}"
