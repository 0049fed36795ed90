"""The import graph: no cycle among modules or packages, every module in a layer, and test
modules that import shared code from `tests.support`, never from each other; and tests/
laid out as daemon/ is (docs/ARCHITECTURE.md#tests).

The layering itself is `make lint`'s (`lint-imports`, the contracts in pyproject.toml);
these checks hold whatever the contracts say, so a cycle fails the test suite too.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.support.paths import REPO, TESTS

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
    daemon = REPO / "daemon"
    loose = sorted(
        p.name for p in daemon.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}
    )
    layer_dirs = sorted(
        f"daemon.{p.name}" for p in daemon.iterdir() if (p / "__init__.py").exists()
    )
    assert (loose, layer_dirs) == ([], sorted(layer for layer in LAYERS if layer != "store"))


def _imported_test_modules(path: Path) -> list[str]:
    """The test modules (`tests.test_*`, `tests.<dir>.test_*`) this file imports, however it
    spells the import."""
    package = ".".join(path.relative_to(TESTS.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return sorted(
        {
            name
            for name in found
            if name.split(".")[0] == "tests"
            and any(part.startswith("test_") for part in name.split(".")[1:])
        }
    )


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in tests/support/ (fixtures in tests/conftest.py), which holds
    no test module: a helper left in a test module ties its importers to that module, and a
    test function or fixture imported by name is collected or used again in the importer."""
    offenders = {
        str(path.relative_to(TESTS.parent)): imported
        for path in sorted(TESTS.rglob("*.py"))
        if (imported := _imported_test_modules(path))
    }
    in_support = sorted(p.name for p in (TESTS / "support").rglob("test_*.py"))
    assert (offenders, in_support) == ({}, [])


NOT_LOADED_BY_SERVE = (
    "click",
    "rich",
    "pygments",
    "pendulum",
    "jinja2",
    "hypothesis",
    "daemon.runtime.upstream",
    "daemon.engine.explain",
    "prometheus_client",
    "daemon.runtime.exposition",
)
"""Modules `trigd serve` does not import until a path needs them (docs/PERFORMANCE.md#memory):
httpx's own command line (click, rich, pygments), pendulum (ISO-8601 durations only), jinja2
(payload templates only: the bench's automations have none), the upstream bridge (with
`[upstream] url` only), explanations (on the first explain request), prometheus-client and
the text it writes (on the first `GET /metrics`: its HTTP servers and `urllib.request`, about
1.1 MB), and test-only libraries."""


def test_serve_does_not_import_what_it_does_not_use() -> None:
    """In a fresh interpreter, as `trigd serve` starts: its modules are imported and a
    configuration without ISO durations is loaded."""
    script = (
        "import sys, json\n"
        "import daemon.cli.main, daemon.runtime.service\n"
        "from daemon.core.config import load_config\n"
        "load_config(None, {'TRIGD_STORE_COMMIT_LINGER': '5ms'}, {})\n"
        f"print(json.dumps([m for m in {NOT_LOADED_BY_SERVE!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []
