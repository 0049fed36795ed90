"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon.core.automations import Automation
from store.connection import Connection
from store.db import Store
from tests.support.engine_harness import Harness, HarnessMaker


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a test's database file lives."""
    return tmp_path / "trigd.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A fresh database file, opened (modules may define their own)."""
    opened = Store.open(db_path)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def conn(store: Store) -> Connection:
    """The writer connection of a fresh database file (modules may define their own)."""
    return store.conn


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[HarnessMaker]:
    """Makes `Harness`es (tests/support/engine_harness.py), each on its own database file;
    closes them after the test."""
    made: list[Harness] = []

    def make(automations: Sequence[Automation], **engine: Any) -> Harness:
        h = Harness(tmp_path / f"trigd-{len(made)}.db", automations, **engine)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
