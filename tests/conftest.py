"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from store.db import Store


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
def conn(store: Store) -> apsw.Connection:
    """The writer connection of a fresh database file (modules may define their own)."""
    return store.conn
