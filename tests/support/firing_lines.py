"""A witness of firings' INFO lines: each line the `daemon.engine.acting` logger writes,
with what was true when it was written, so a test can tell a line written after its
transaction committed from one written inside it (or for a firing that rolled back)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from store.connection import Connection
from store.db import Store

FIRING_LOGGER = "daemon.engine.acting"


@attrs.frozen
class WrittenLine:
    firing: str
    """The line's `firing` field."""
    message: str
    main_thread: bool
    """Written on the main thread (trio's, or the test's), not the store thread."""
    in_transaction: bool
    """The writer connection was inside a transaction."""
    committed_rows: int
    """Outbox rows of this firing another connection could read then."""
    noted: tuple[str, ...]
    """What `note` returned then (e.g. the submissions resolved so far)."""


class FiringLines(logging.Handler):
    """Install with `watching`; `lines` are the firing lines written meanwhile; `note` is
    called as each is written (what else the test wants to know then)."""

    def __init__(
        self, db_path: Path, writer: Connection, note: Callable[[], tuple[str, ...]] = tuple
    ) -> None:
        super().__init__(logging.INFO)
        self.db_path = db_path
        self.writer = writer
        self.note = note
        self.lines: list[WrittenLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        firing = str(getattr(record, "firing", ""))
        reader = Store.open_readonly(self.db_path)
        try:
            row = reader.conn.execute(
                "SELECT count(*) FROM outbox WHERE json_extract(document, '$.firing.id') = ?",
                (firing,),
            ).fetchone()
        finally:
            reader.conn.close()
        assert row is not None
        self.lines.append(
            WrittenLine(
                firing,
                record.getMessage(),
                threading.current_thread() is threading.main_thread(),
                self.writer.in_transaction,
                int(row[0]),
                self.note(),
            )
        )


@contextmanager
def watching(lines: FiringLines) -> Iterator[FiringLines]:
    """`lines` receives the firing lines written inside the block (at INFO)."""
    logger = logging.getLogger(FIRING_LOGGER)
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
