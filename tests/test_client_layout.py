"""The client's layout: dependencies point one way (cli -> commands -> everything else), no
module of client/ imports another in a cycle, and client/ never imports the server."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parent.parent / "client"


def _module_imports(path: Path) -> set[str]:
    """client.* modules that `path` imports at module level (not inside functions)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module == "client":
                found |= {f"client.{alias.name}" for alias in node.names}
            elif node.module.startswith("client."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("client.")}
    return found


def _all_imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the client modules it imports at module level."""
    return {f"client.{p.stem}": _module_imports(p) for p in sorted(CLIENT.glob("*.py"))}


def importers(graph: dict[str, set[str]], module: str) -> set[str]:
    return {name for name, targets in graph.items() if module in targets}


def test_the_graph_is_read_from_the_sources() -> None:
    graph = import_graph()
    assert len(graph) >= 20
    assert "client.commands" in graph["client.cli"]  # the check sees real imports


def test_client_modules_import_each_other_without_cycles() -> None:
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in client/: {' -> '.join(exc.args[1])}")
    assert order.index("client.commands") < order.index("client.cli")


def test_a_cycle_would_be_found() -> None:
    graph = import_graph()
    graph["client.errors"] = {*graph["client.errors"], "client.cli"}  # errors -> cli -> ... -> errors
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


def test_dependencies_point_one_way_from_the_cli() -> None:
    graph = import_graph()
    assert importers(graph, "client.cli") == set(), "nothing imports the CLI"
    assert importers(graph, "client.commands") == {"client.cli"}, "only the CLI imports commands"


@pytest.mark.parametrize("path", sorted(CLIENT.glob("*.py")), ids=lambda p: p.name)
def test_no_import_hides_inside_a_function_and_the_server_stays_out(path: Path) -> None:
    every = {m for m in _all_imports(path) if m.startswith("client")}
    top = _module_imports(path) | {m for m in every if m == "client"}
    hidden = {m for m in every if m.startswith("client.")} - top
    assert not hidden, f"{path.name} imports {hidden} inside a function (a cycle kept alive?)"
    assert not any(m == "server" or m.startswith("server.") for m in _all_imports(path)), path.name
