"""daemon/runtime/checkpointer.py: the WAL is checkpointed beside the writer, and stays
bounded, on a real database file."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import apsw
import trio
import trio.lowlevel

from daemon.runtime.checkpointer import Checkpointer
from daemon.runtime.gateway import StoreGateway
from store.db import Store

REQUEST_AT = 64  # WAL frames
PAGE = 4_096  # SQLite's page size
ROW = "x" * 6_000  # two pages of overflow and a leaf: a few frames a commit


def wal_pages(store: Store) -> int:
    """The WAL file's size in pages: the most frames it held since it was created (SQLite
    starts it over from its beginning, it does not shrink it)."""
    return os.path.getsize(f"{store.path}-wal") // PAGE


def commit_rows(conn: apsw.Connection, first: int, count: int) -> None:
    """``count`` commits of one row each, as the evaluator's batches are."""
    for n in range(first, first + count):
        with conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (f"row {n}", ROW))


async def wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (the test's nursery bounds the wait)."""
    while not condition():  # noqa: ASYNC110  counters of another thread's work
        await trio.sleep(0.005)


async def test_checkpoints_beside_the_writer_keep_the_wal_bounded(
    store: Store, timed_nursery: trio.Nursery
) -> None:
    gateway = StoreGateway(store)
    checkpointer = Checkpointer(gateway, request_at=REQUEST_AT, inline_at=1_000_000)
    await timed_nursery.start(checkpointer.run)
    waves, per_wave = 24, 40  # a wave writes 40 commits of 5-7 frames, back to back
    for wave in range(waves):
        await gateway.run(commit_rows, wave * per_wave, per_wave)
        await wait_for(partial(lambda w: checkpointer.stats.complete > w, wave))
    # without them the WAL would hold every frame written (5,000 or more); with them, a
    # wave's and what is committed while a checkpoint is arranged
    assert wal_pages(store) < 1_500 < checkpointer.stats.frames / 3
    assert checkpointer.inline == 0  # the writer never had to
    count = store.conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'row %'").fetchone()
    assert count == (waves * per_wave,)


async def test_a_reader_holds_back_checkpoints_not_the_writer(
    store: Store, timed_nursery: trio.Nursery
) -> None:
    gateway = StoreGateway(store)
    checkpointer = Checkpointer(gateway, request_at=REQUEST_AT, inline_at=1_000_000)
    await timed_nursery.start(checkpointer.run)
    reader = apsw.Connection(str(store.path), flags=apsw.SQLITE_OPEN_READONLY)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM meta").fetchall()  # a snapshot the WAL must keep
    await gateway.run(commit_rows, 0, 100)  # every commit goes through
    await wait_for(lambda: checkpointer.stats.checkpoints > 0)
    assert checkpointer.stats.complete == 0
    assert wal_pages(store) > 100  # kept for the reader
    reader.execute("COMMIT")
    reader.close()
    # asked again once the WAL has grown by the threshold: then it all goes
    n = 100
    while checkpointer.stats.complete == 0:
        await gateway.run(commit_rows, n, 1)
        n += 1
        await trio.lowlevel.checkpoint()
    assert n < 100 + 2 * REQUEST_AT  # within the threshold's worth of commits
