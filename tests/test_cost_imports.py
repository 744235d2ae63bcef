"""The cost package's layering, read from its source: the pure model (`cost.model`) imports no other cost module
and nothing that runs on the device itself; what measures (`cost.measure`) imports the model, never the reverse;
no cost module imports another inside a function; the import graph among them has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import nanoflow_fx.cost

PACKAGE = "nanoflow_fx.cost"
MODULES = {f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE: p
           for p in Path(nanoflow_fx.cost.__file__).parent.glob("*.py")}


def _imported(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules an import statement loads (`from pkg import sub` loads `pkg.sub` when it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    return {base} | {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """The modules `module` imports when it loads (its `TYPE_CHECKING` block left out), and those imported inside
    its functions."""
    tree = ast.parse(MODULES[module].read_text())
    loaded, deferred = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (deferred if in_function else loaded).update(_imported(node))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return loaded, deferred


def _cost_edges() -> dict[str, set[str]]:
    """Per cost module, the cost modules it imports, when it loads or inside a function (a submodule's implicit
    load of the package left out)."""
    return {m: {d for d in set.union(*_imports(m)) if d in MODULES and d != PACKAGE} for m in MODULES}


def test_no_cost_module_imports_another_inside_a_function() -> None:
    for module in MODULES:
        assert not {d for d in _imports(module)[1] if d.startswith(PACKAGE)}, module


def test_the_model_is_pure_and_measurement_depends_on_it_alone() -> None:
    edges = _cost_edges()
    assert edges[f"{PACKAGE}.model"] == set()
    assert edges[f"{PACKAGE}.measure"] == {f"{PACKAGE}.model"}
    assert {m for m, deps in edges.items() if f"{PACKAGE}.measure" in deps} == {f"{PACKAGE}.autotune"}
    loaded, deferred = _imports(f"{PACKAGE}.model")
    assert not {d for d in loaded | deferred if d.split(".")[0] in ("torch", "triton", "transformers")}
    names = {n.id for n in ast.walk(ast.parse(MODULES[f"{PACKAGE}.model"].read_text())) if isinstance(n, ast.Name)}
    assert "torch" not in names


def test_the_cost_import_graph_has_no_cycle() -> None:
    edges = _cost_edges()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in edges[module]:
            visit(dep, (*path, module))
        done.add(module)

    for module in edges:
        visit(module, ())
