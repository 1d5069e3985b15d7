"""Imports point down, and no module imports itself back.

Parses every module of ``patchlab/``, ``registry/`` and ``cli/`` (ast, nothing is imported) and checks:

1. packages: ``cli`` -> ``registry`` -> ``patchlab``. ``patchlab`` imports neither ``registry`` nor ``cli``;
   ``registry`` does not import ``cli``.
2. inside ``patchlab``: the layer order in ``PATCHLAB_LAYERS`` (skipped while that list is empty).
3. no import loop between modules. The graph has every import that runs: module level and inside
   functions; imports under ``if TYPE_CHECKING:`` never run and are left out of it (they still count for
   1 and 2). ``patchlab/__init__.py`` loads its names with ``importlib`` in ``__getattr__``: not an import
   statement, so not an edge. An edge goes to the module named (``from registry import refs`` ->
   ``registry.refs``; ``from registry import Registry`` -> ``registry``), not to the packages above it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("patchlab", "registry", "cli")
# may import (besides itself)
ALLOWED = {"patchlab": set(), "registry": {"patchlab"}, "cli": {"registry", "patchlab"}}

# Inside patchlab, lowest layer first: a module may import its own layer and the layers before it.
# Each layer is a tuple of module prefixes relative to ``patchlab`` ("errors", "io", "io.patch"...); the
# longest matching prefix decides a module's layer. Every patchlab module except ``__init__`` must be in
# one. Empty: the check is skipped.
PATCHLAB_LAYERS: list[tuple[str, ...]] = [
    ("errors", "names", "cores", "digests"),
    ("kernels",),
    ("encodings",),
    ("io",),
    ("plan",),
    ("engine",),
    ("measure",),
    ("methods",),
    ("report",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere in the tree, and whether it only runs for type checkers."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _imports(node, typing_only)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """First-party modules an import statement names (empty for third-party ones)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        # `from pkg import sub` names the module pkg.sub when there is one, else something defined in pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        if name.split(".")[0] not in PACKAGES:
            continue
        while name not in MODULES and "." in name:  # `import a.b.attr`-like: the longest module prefix
            name = name.rpartition(".")[0]
        if name in MODULES and name not in out:
            out.append(name)
    return out


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported module, line, typing only)]."""
    graph: dict[str, list[tuple[str, int, bool]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = []
        for node, typing_only in _imports(tree):
            for target in _targets(module, path, node):
                if target != module:
                    edges.append((target, node.lineno, typing_only))
        graph[module] = edges
    return graph


GRAPH = _graph()


def test_the_parser_sees_the_packages():
    assert {"patchlab", "registry.api", "cli.app", "cli.common"} <= set(MODULES)
    assert "registry.api" in {t for t, _, _ in GRAPH["registry"]}
    # relative, function-level and TYPE_CHECKING imports are all seen
    assert any(t == "patchlab.measure.results" and ty for t, _, ty in GRAPH["registry.evaluations"])
    assert any(t == "patchlab.measure.results" and not ty for t, _, ty in GRAPH["registry.evaluations"])


def test_packages_import_downward_only():
    bad = []
    for module, edges in GRAPH.items():
        pkg = module.split(".")[0]
        for target, line, _ in edges:
            tpkg = target.split(".")[0]
            if tpkg != pkg and tpkg not in ALLOWED[pkg]:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "upward imports (cli -> registry -> patchlab):\n" + "\n".join(bad)


def _layer_of(module: str) -> int | None:
    rel = module.removeprefix("patchlab.")
    best, best_len = None, -1
    for i, layer in enumerate(PATCHLAB_LAYERS):
        for prefix in layer:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


@pytest.mark.skipif(not PATCHLAB_LAYERS, reason="PATCHLAB_LAYERS is not filled in yet")
def test_patchlab_layers():
    inner = [m for m in MODULES if m.startswith("patchlab.")]
    unplaced = [m for m in inner if _layer_of(m) is None]
    assert not unplaced, f"patchlab modules in no layer of PATCHLAB_LAYERS: {unplaced}"
    bad = []
    for module in inner:
        for target, line, _ in GRAPH[module]:
            if target.startswith("patchlab.") and _layer_of(target) > _layer_of(module):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} (a higher layer)")
    assert not bad, "upward imports inside patchlab:\n" + "\n".join(bad)


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the runtime import graph (Tarjan)."""
    runtime = {m: sorted({t for t, _, typing_only in edges if not typing_only}) for m, edges in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in runtime[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(runtime):
        if v not in index:
            visit(v)
    return sorted(cycles)


def _describe(component: list[str]) -> str:
    members = set(component)
    lines = [f"  {' <-> '.join(component)}:"]
    for m in component:
        for target, line, typing_only in GRAPH[m]:
            if target in members and not typing_only:
                lines.append(f"    {MODULES[m].relative_to(ROOT)}:{line} imports {target}")
    return "\n".join(lines)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import loops:\n" + "\n".join(_describe(c) for c in cycles)
