"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from store.db import Store


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[apsw.Connection]:
    """The writer connection of a fresh database file (modules may define their own)."""
    store = Store.open(tmp_path / "trigd.db")
    try:
        yield store.conn
    finally:
        store.close()
