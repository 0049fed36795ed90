"""daemon/runtime/checkpointer.py: the WAL is checkpointed beside the writer, and stays
bounded, on a real database file."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import apsw
import trio

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
    await gateway.run(commit_rows, 100, 1)  # the next commit past the threshold asks again
    await wait_for(lambda: checkpointer.stats.complete > 0)


async def test_the_writer_gets_its_autocheckpoint_back_when_the_task_ends(store: Store) -> None:
    gateway = StoreGateway(store)
    checkpointer = Checkpointer(gateway, request_at=REQUEST_AT, inline_at=1_000_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(checkpointer.run)
        nursery.cancel_scope.cancel()
    await gateway.run(commit_rows, 0, 2_000)  # past SQLite's 4,000 frames: it checkpoints
    assert checkpointer.stats.checkpoints == 0
    assert wal_pages(store) < 4_500
