"""The WAL checkpointer: the writer's WAL is copied into the database file beside its
commits, not inside them.

Why: with SQLite's autocheckpoint, the COMMIT that takes the WAL past its threshold copies
thousands of pages into the database file and fsyncs it before it returns: in a trickle
of 1,000 events/s that is a commit of 4 to 9 ms instead of 0.5 about once a second, and
every acknowledgement waiting on it, or queued behind it, pays for it
(docs/PERFORMANCE.md#commit-linger).

Theory of operation. At start the task replaces the writer's autocheckpoint with a hook
(``store.db.WalCheckpoints``, installed through the gateway, in the store thread). After
each COMMIT that leaves ``[store] wal_checkpoint_pages`` frames or more in the WAL, the
hook asks this task for a checkpoint (once until it is taken up); the task runs a PASSIVE
checkpoint on a connection of its own, in a worker thread, while the writer keeps
committing. A PASSIVE checkpoint waits for nobody and copies the frames committed when it
started: then the WAL is wholly in the database file, and the writer's next transaction
starts it over from its beginning (or, if that transaction began before the copy ended,
the writer copies the tail committed since at its next COMMIT, after which the WAL starts
over). Frames a reader still needs (an events-out backfill, a backtest, ``trigd status``)
stay; the writer asks again once the WAL has grown by the threshold.

Bounds: if the checkpoints fall behind (this thread starved, the store failing here),
the writer checkpoints inline once the WAL reaches ``[store] wal_max_pages``, as
autocheckpoint would, so the WAL never grows past that by more than a batch. Only a
reader's snapshot can hold it longer (no checkpoint may copy frames a reader still
needs, SQLite's own neither), until that reader ends. Crash safety is SQLite's: a
checkpoint is the same operation whichever connection runs it. When the task ends the
writer gets its autocheckpoint back.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import apsw
import attrs
import trio

from daemon.runtime.gateway import StoreGateway
from daemon.runtime.store_trouble import STORE_TROUBLE
from store.db import (
    WAL_AUTOCHECKPOINT_PAGES,
    WalCheckpoints,
    checkpoint,
    checkpoint_at_commit,
    checkpoint_in_background,
    open_checkpointer,
)

log = logging.getLogger(__name__)


@attrs.define
class CheckpointerStats:
    """Counters for the tests and ``/metrics``."""

    checkpoints: int = 0  # PASSIVE checkpoints run by the task
    complete: int = 0  # requests that ended with the whole WAL in the database file
    frames: int = 0  # WAL frames in the database file after each checkpoint, summed


class Checkpointer:
    """Runs the writer's checkpoints in a thread of its own (see the module docstring)."""

    def __init__(self, gateway: StoreGateway, *, request_at: int, inline_at: int) -> None:
        self._gateway = gateway
        self._request_at = request_at
        self._inline_at = inline_at
        self._wake = trio.Event()
        self._asked = False  # set by the store thread, cleared by the task
        self._token: trio.lowlevel.TrioToken | None = None
        self._failing = False
        self._hook: WalCheckpoints | None = None
        self.stats = CheckpointerStats()

    @property
    def inline(self) -> int:
        """Checkpoints the writer ran at COMMIT because the WAL reached its bound."""
        return 0 if self._hook is None else self._hook.inline

    @property
    def tails(self) -> int:
        """Checkpoints the writer ran at COMMIT of the frames committed during one of ours."""
        return 0 if self._hook is None else self._hook.tails

    def _request(self) -> None:
        """The writer's hook, in the store thread: ask for a checkpoint, once until the
        task takes it up (a request lost to a race is made again by the next commit)."""
        if self._asked or self._token is None:
            return
        self._asked = True
        # trio gone: the daemon is stopping, and the writer's close checkpoints
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake_up)

    def _wake_up(self) -> None:
        self._wake.set()  # in trio's thread: the event the task waits on now

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Install the hook, then take checkpoints when asked, until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._hook = await self._gateway.run(
            checkpoint_in_background, self._request_at, self._inline_at, self._request
        )
        conn: apsw.Connection | None = None
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._asked = False
                conn = await self._checkpoint(conn)
        finally:
            with trio.CancelScope(shield=True):
                await self._gateway.run(checkpoint_at_commit, WAL_AUTOCHECKPOINT_PAGES)
                if conn is not None:
                    conn.close()

    async def _checkpoint(self, conn: apsw.Connection | None) -> apsw.Connection | None:
        """A PASSIVE checkpoint; store trouble is logged (once, until it clears) and the
        connection reopened next time: the writer's bound holds meanwhile."""
        try:
            if conn is None:
                path = Path(self._gateway.store.path)
                conn = await trio.to_thread.run_sync(open_checkpointer, path)
            frames, copied = await trio.to_thread.run_sync(checkpoint, conn)
        except apsw.BusyError:  # the writer is checkpointing (a tail): nothing to do
            return conn
        except STORE_TROUBLE as exc:
            if not self._failing:
                log.warning(
                    "cannot checkpoint the WAL beside the writer (%s); the writer will at "
                    "[store] wal_max_pages frames",
                    exc,
                )
            self._failing = True
            if conn is not None:
                conn.close()
            return None
        if self._failing:
            log.warning("checkpointing the WAL beside the writer again")
            self._failing = False
        self.stats.checkpoints += 1
        self.stats.frames += copied
        if copied >= frames:  # else a reader needs the rest
            self.stats.complete += 1
        if self._hook is not None:
            self._hook.checkpointed(frames, copied)
        return conn
