"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.core.automations import Automation
from store.connection import Connection
from store.db import Store
from tests.support.engine_harness import Harness, HarnessMaker
from tests.support.ingest_client import Starter
from tests.support.sender_harness import TEST_TIMEOUT


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


@pytest.fixture
async def timed_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery of the test's own that fails the test after `TEST_TIMEOUT` seconds and is
    cancelled when the test ends (pytest-trio's `nursery` has neither)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            yield nursery
            nursery.cancel_scope.cancel()


@pytest.fixture
def start(nursery: trio.Nursery, store: Store, db_path: Path) -> Starter:
    """Starts ingest and the evaluator in-process on pytest-trio's nursery, on the test's
    `store` (`tests/support/ingest_client.py`)."""
    return Starter(nursery, store, db_path)
