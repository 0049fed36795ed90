"""The one door from trio code to the SQLite store.

apsw connections may be used from any thread, but never from two at once, and a blocking
``COMMIT`` (an fsync under ``synchronous=full``) must not stall the trio loop. So every
piece of store work is a plain function of the connection, run in a worker thread behind
a ``CapacityLimiter(1)``: one thread at a time touches the writer connection.

The worker call is not abandoned on cancellation: trio waits for the thread to return
before delivering ``Cancelled``, so a transaction is never left half-done on a connection
that the service is about to close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import apsw
import trio

from store.db import Store

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class StoreGateway:
    """Serialises store work onto one worker thread at a time."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._limiter = trio.CapacityLimiter(1)

    @property
    def store(self) -> Store:
        return self._store

    async def run(self, fn: Callable[[apsw.Connection, Unpack[Ts]], T], *args: *Ts) -> T:
        """Run ``fn(conn, *args)`` in the store thread; ``fn`` opens its own transaction."""
        conn = self._store.conn
        return await trio.to_thread.run_sync(
            lambda: fn(conn, *args), limiter=self._limiter, abandon_on_cancel=False
        )
