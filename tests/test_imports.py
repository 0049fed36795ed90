"""The import graph: no cycle among modules or packages, and every module in a layer.

The layering itself is `make lint`'s (`lint-imports`, the contracts in pyproject.toml);
these checks hold whatever the contracts say, so a cycle fails the test suite too.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grimp
import pytest

ROOTS = ("daemon", "store")
LAYERS = ("daemon.cli", "daemon.runtime", "daemon.engine", "daemon.wire", "store", "daemon.core")
"""Top to bottom, as in `[tool.importlinter]` and docs/ARCHITECTURE.md."""


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*ROOTS)


def test_no_module_is_in_a_cycle(graph: grimp.ImportGraph) -> None:
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append(" -> ".join((importer, *back)))
    assert cycles == []


def _packages(graph: grimp.ImportGraph) -> list[str]:
    return sorted(m for m in graph.modules if graph.find_children(m))


def test_no_package_is_in_a_cycle(graph: grimp.ImportGraph) -> None:
    """Among the children of every package, and among the layers."""
    groups = [sorted(graph.find_children(package)) for package in _packages(graph)]
    groups.append(sorted(LAYERS))
    cycles = [
        f"{a} <-> {b}"
        for group in groups
        for a, b in itertools.combinations(group, 2)
        if graph.chain_exists(importer=a, imported=b, as_packages=True)
        and graph.chain_exists(importer=b, imported=a, as_packages=True)
    ]
    assert cycles == []


def test_every_daemon_module_is_in_a_layer() -> None:
    """A module directly under daemon/ would escape the layering contract."""
    daemon = Path(__file__).parent.parent / "daemon"
    loose = sorted(
        p.name for p in daemon.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}
    )
    layer_dirs = sorted(
        f"daemon.{p.name}" for p in daemon.iterdir() if (p / "__init__.py").exists()
    )
    assert (loose, layer_dirs) == ([], sorted(layer for layer in LAYERS if layer != "store"))
