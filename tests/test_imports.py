"""No import cycles among the project's modules (edgetune/, flows/, stages/), read statically:
every import statement, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("edgetune", "flows", "stages")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, a package by its __init__.py."""
    out = {}
    for folder in PACKAGES:
        for file in (REPO / folder).rglob("*.py"):
            name = ".".join(file.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = file
    return out


def imported(node: ast.AST, package: str) -> list[str]:
    """The dotted names one import statement may load (`from a import b`: a and a.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (not its own parent packages)."""
    mods = modules()
    graph = {m: set() for m in mods}
    for name, file in mods.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            for target in imported(node, package):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on.discard(component[-1])
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child), on.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on:
                low[node] = min(low[node], index[child])
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "edgetune.federated.registry" in graph["edgetune.config"]
    assert "edgetune.federated.engine" in graph["edgetune.federated.flower.serverapp"]  # in serve()


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_edgetune_run_finds_the_checkout_from_any_folder_in_it(tmp_path):
    """`edgetune run` starts flows.pipeline in the checkout's root (a process, not an import)."""
    from edgetune.cli import checkout_root
    from edgetune.config import BadInput

    assert checkout_root(REPO / "edgetune" / "federated") == REPO == checkout_root(REPO)
    with pytest.raises(BadInput, match="not inside an edgetune checkout"):
        checkout_root(tmp_path)
