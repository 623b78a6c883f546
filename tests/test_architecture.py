"""The package's structure: no import cycle anywhere in openmae/, and the layers import only downward.

Imports are read with ``ast`` from every module, at module level and inside functions alike (a
deferred import still makes the two modules depend on each other). ``from openmae.a import b`` is
an edge to ``openmae.a.b`` when that is a module, else to ``openmae.a``; parent packages are not
counted (Python runs them first, but a module does not depend on its siblings through them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import openmae

ROOT = Path(openmae.__file__).parent


def module_name(path: Path) -> str:
    parts = ("openmae",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The openmae modules ``name`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_deferred_and_from_imports():
    assert "openmae.interop" in GRAPH["openmae"]  # from openmae.interop import ...
    assert "openmae.runs" in GRAPH["openmae.commands.pretrain"]  # deferred, inside a function


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles in openmae/: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("leaf", ["openmae.io", "openmae.registry", "openmae.patches", "openmae.masking"])
def test_leaves_import_nothing_of_openmae(leaf):
    assert GRAPH[leaf] == set()


def test_models_import_only_models_and_leaves():
    allowed = {"openmae.registry", "openmae.patches", "openmae.masking"}
    for name, deps in GRAPH.items():
        if name.startswith("openmae.models"):
            outside = {d for d in deps if not d.startswith("openmae.models")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}: model files import torch, timm, each other and the leaves only"


def test_training_state_does_not_read_foreign_formats():
    assert not {d for d in GRAPH["openmae.checkpoint"] if d.startswith("openmae.interop")}


# -- the README's layout is drawn from the code -----------------------------------------------------

README = ROOT.parent / "README.md"


def layout_block() -> str:
    text = README.read_text()
    start = text.index("```", text.index("## Layout"))
    return text[start + 3 : text.index("```", start + 3)]


def top_unit(module: str) -> str:
    """The README line a module belongs to: its top-level module, or its subpackage (``models/``)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py"):
        return parts[1] + "/"
    return parts[1] + ".py"


def test_readme_layout_names_every_module():
    block = layout_block()
    for name, path in MODULES.items():
        if name in ("openmae", "openmae.__main__") or name.startswith("openmae.commands."):
            continue  # the package itself; commands are named by `openmae --help`
        assert path.name in block, f"README's layout does not name {path.relative_to(ROOT.parent)}"
        assert top_unit(name) in block


def test_readme_layout_is_bottom_up():
    """Every module imports only what an earlier line of the layout (or its own line) holds."""
    import re

    order: list[str] = []
    units = {top_unit(n) for n in MODULES if n not in ("openmae", "openmae.__main__")}
    for line in layout_block().splitlines():
        head = re.match(r"\s{2}(\S+)", line)  # a line's own unit stands first, two spaces in
        if head and head.group(1) in units and head.group(1) not in order:
            order.append(head.group(1))
    assert set(order) == units, f"layout lines missing for {sorted(units - set(order))}"
    rank = {unit: i for i, unit in enumerate(order)}
    for name, deps in GRAPH.items():
        if name in ("openmae", "openmae.__main__"):
            continue
        for dep in deps:
            if dep == "openmae":
                continue
            assert rank[top_unit(dep)] <= rank[top_unit(name)], (
                f"{name} imports {dep}, which README's layout lists below it"
            )
