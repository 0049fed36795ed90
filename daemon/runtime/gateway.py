"""The one door from trio code to the SQLite store.

apsw connections may be used from any thread, but never from two at once, and a blocking
``COMMIT`` (an fsync under ``synchronous=full``) must not stall the trio loop. So every
piece of store work is a plain function of the connection, run by one dedicated worker
thread that takes calls from a queue, one at a time: one thread at a time touches the
writer connection.

Two classes of calls (``daemon.core.store_queue``): ``run_urgent`` for the evaluator's
batches, whose acks clients wait on, and ``run`` for everything else (the sender, the
inbox pump, the sweeper, metrics, reads). An urgent call goes before the background calls
waiting, except that after ``URGENT_IN_A_ROW`` urgent calls in a row one background call
runs; within a class, calls run in the order they came.

Theory of operation. ``run`` queues the call and parks the calling task; the worker runs
it (in a copy of the caller's context, as ``trio.to_thread.run_sync`` does) and hands the
outcome back through the trio token, which reschedules the task. Each call queued puts one
token in a ``SimpleQueue`` (cheap to wait on, with a timeout); each token the worker takes
lets it run the call that ``StoreQueue`` picks then. The worker is started on
the first call and stops after ``IDLE_SECONDS`` without work (the next call starts another),
so an idle gateway holds no thread. A dedicated thread rather than ``trio.to_thread``:
trio's thread cache names and renames its thread around every job, which costs the store
thread several per cent of its CPU when the daemon commits one event at a time.

The worker call is not abandoned on cancellation: the task waits for the call to return
before ``Cancelled`` is delivered (at its next checkpoint), so a transaction is never left
half-done on a connection that the service is about to close. An exception raised by the
call propagates to the caller.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Final, TypeVar, TypeVarTuple, Unpack, cast

import outcome
import trio

from daemon.core.store_queue import JobClass, StoreQueue
from store.connection import Connection
from store.db import Store

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

IDLE_SECONDS: Final = 10.0
"""How long the worker thread waits for a call before it ends (seconds)."""

_Job = Callable[[], None]


class StoreGateway:
    """Serialises store work onto one worker thread."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._jobs: StoreQueue[_Job] = StoreQueue()  # under the lock
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()  # one per queued job
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    @property
    def store(self) -> Store:
        return self._store

    async def run(self, fn: Callable[[Connection, Unpack[Ts]], T], *args: *Ts) -> T:
        """Run ``fn(conn, *args)`` in the store thread; ``fn`` opens its own transaction.
        ``conn`` is the store's connection, carrying its in-memory state
        (``store.connection.ConnectionState``), which only this thread touches. Background
        work: urgent calls waiting go first."""
        return await self._call(JobClass.BACKGROUND, lambda conn: fn(conn, *args))

    async def run_urgent(self, fn: Callable[[Connection, Unpack[Ts]], T], *args: *Ts) -> T:
        """As ``run``, ahead of the background calls waiting: for work a client waits on."""
        return await self._call(JobClass.URGENT, lambda conn: fn(conn, *args))

    async def _call(self, job_class: JobClass, fn: Callable[[Connection], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self._store.conn
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        context = contextvars.copy_context()

        def job() -> None:
            result = outcome.capture(context.run, fn, conn)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._submit(job, job_class)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # never abandon the call: wait for it

        # resumed with the call's outcome: its value, or its exception raised here
        return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))

    def _submit(self, job: _Job, job_class: JobClass) -> None:
        with self._lock:
            self._jobs.put(job, job_class)
            self._tokens.put(None)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="trigd-store", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        jobs, tokens, lock = self._jobs, self._tokens, self._lock
        while True:
            try:
                tokens.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with lock:  # `_submit` queues under the lock: nothing can slip by
                    if not jobs:
                        self._worker = None
                        return
                continue
            with lock:
                job = jobs.take()
            assert job is not None  # a token for every job queued
            job()
