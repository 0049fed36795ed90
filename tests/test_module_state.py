"""No module-level mutable state in `daemon/` or `store/` (docs/ARCHITECTURE.md#the-store).

What is cached about a connection lives in `store.connection.ConnectionState`, what an
engine call found out is its return value: a module-level dict, list or set would be state
shared by every connection and every engine, invisible in any signature.

The rule, an AST scan of every module's top-level statements (and of `if`/`try` blocks at
top level): an assignment whose value is a dict, list or set display or comprehension, or
a call to `dict`, `list`, `set`, `bytearray`, `defaultdict`, `OrderedDict`, `Counter`,
`deque` or a `weakref` container, is refused; so is a `global` statement (a module-level
name rebound at run time). Immutable values (`frozenset`, tuples, `MappingProxyType`
around a literal) are fine whatever the name: constant tables are written that way. A
memo of a pure function (`functools.lru_cache`, e.g. `store.buckets.key_json`) is not
state and not flagged. `__all__` (a list by convention, read by `import *`) is not either.

Exceptions: `ALLOWED` below, each with why.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTABLE_CALLS = frozenset(
    {
        "dict",
        "list",
        "set",
        "bytearray",
        "defaultdict",
        "OrderedDict",
        "Counter",
        "deque",
        "WeakKeyDictionary",
        "WeakValueDictionary",
        "WeakSet",
    }
)
MUTABLE_DISPLAYS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)

ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        # apsw.bestpractice.apply() installs process-wide hooks in apsw itself; the flag
        # only mirrors that process-global fact so they are installed once.
        ("store/db.py", "_best_practice_applied"),
    }
)
"""(module path, name) pairs allowed to hold mutable state at module level."""


def _call_name(node: ast.expr) -> str | None:
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_mutable(value: ast.expr | None) -> bool:
    if value is None:
        return False
    return isinstance(value, MUTABLE_DISPLAYS) or _call_name(value) in MUTABLE_CALLS


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _top_level(stmt.body)
            yield from _top_level(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body)
            for handler in stmt.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(stmt.orelse)
            yield from _top_level(stmt.finalbody)


def _targets(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.Assign):
        names: list[str] = []
        for target in stmt.targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Name):
                    names.append(node.id)
        return names
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def module_level_mutables(source: str) -> list[tuple[int, str]]:
    """(line, name) of every module-level assignment of a mutable container."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for stmt in _top_level(tree.body):
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and _is_mutable(stmt.value):
            found.extend((stmt.lineno, name) for name in _targets(stmt) if name != "__all__")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.extend((node.lineno, name) for name in node.names)
    return found


def test_the_scan_finds_what_it_should() -> None:
    source = (
        "import weakref\n"
        "from typing import Final\n"
        "A = {}\n"
        "_b: dict[str, int] = {}\n"
        "C: Final = [1]\n"
        "d = weakref.WeakKeyDictionary()\n"
        "if True:\n"
        "    e = set()\n"
        "OK: Final = frozenset({1})\n"
        "ALSO_OK = (1, 2)\n"
        "__all__ = ['f']\n"
        "def f() -> None:\n"
        "    global g\n"
        "    local = {}\n"
    )
    found = [name for _, name in module_level_mutables(source)]
    assert found == ["A", "_b", "C", "d", "e", "g"]


def test_no_module_level_mutable_state_in_daemon_or_store() -> None:
    offenders = []
    for package in ("daemon", "store"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for line, name in module_level_mutables(path.read_text(encoding="utf-8")):
                if (relative, name) not in ALLOWED:
                    offenders.append(f"{relative}:{line}: {name}")
    assert offenders == [], "module-level mutable containers (make them immutable):\n" + (
        "\n".join(offenders)
    )
