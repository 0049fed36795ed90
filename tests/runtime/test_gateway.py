"""daemon/runtime/gateway.py: one worker thread, calls in order, outcomes back, never abandoned."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator

import apsw
import pytest
import trio
import trio.testing

from daemon.core import store_queue
from daemon.runtime import gateway as gateway_module
from daemon.runtime.gateway import StoreGateway
from store.db import Store


def whoami(conn: apsw.Connection, tag: int) -> tuple[int, int]:
    return threading.get_ident(), tag


async def test_calls_run_in_one_thread_that_is_not_trios(store: Store) -> None:
    gateway = StoreGateway(store)
    results = [await gateway.run(whoami, n) for n in range(5)]
    assert [tag for _, tag in results] == list(range(5))
    assert len({ident for ident, _ in results}) == 1
    assert results[0][0] != threading.get_ident()


async def test_concurrent_callers_never_overlap(store: Store) -> None:
    gateway = StoreGateway(store)
    busy = threading.Lock()
    overlaps: list[int] = []
    done: list[int] = []

    def work(conn: apsw.Connection, n: int) -> None:
        if not busy.acquire(blocking=False):
            overlaps.append(n)
            return
        try:
            time.sleep(0.002)
            with conn:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", (f"k{n}",))
            done.append(n)
        finally:
            busy.release()

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(gateway.run, work, n)
    assert overlaps == []
    assert sorted(done) == list(range(20))


async def test_an_exception_propagates_to_the_caller(store: Store) -> None:
    gateway = StoreGateway(store)

    def fail(conn: apsw.Connection) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await gateway.run(fail)
    assert (await gateway.run(whoami, 1))[1] == 1  # the worker survives it


async def test_a_cancelled_caller_waits_for_its_call_to_finish(store: Store) -> None:
    gateway = StoreGateway(store)
    started = threading.Event()
    finished: list[bool] = []

    def slow(conn: apsw.Connection) -> None:
        started.set()
        time.sleep(0.2)
        finished.append(True)

    returned_after: list[list[bool]] = []
    with trio.move_on_after(0.05) as scope:
        await gateway.run(slow)
        returned_after.append(list(finished))
        await trio.lowlevel.checkpoint()  # where the cancellation is delivered
    assert scope.cancelled_caught
    assert started.is_set()
    assert returned_after == [[True]]  # not abandoned: it returned once the call was done


async def test_an_idle_worker_ends_and_the_next_call_starts_another(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "IDLE_SECONDS", 0.01)
    gateway = StoreGateway(store)
    first, _ = await gateway.run(whoami, 0)
    deadline = time.monotonic() + 5
    while any(t.ident == first for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the idle worker did not end"
        await trio.sleep(0.01)
    assert (await gateway.run(whoami, 1))[1] == 1


def record(conn: apsw.Connection, order: list[str], tag: str) -> None:
    order.append(tag)


@contextlib.asynccontextmanager
async def store_thread_busy(gateway: StoreGateway) -> AsyncIterator[trio.Nursery]:
    """A nursery whose calls queue behind one that holds the store thread until the block
    ends; the block's calls then run."""
    gate, entered = threading.Event(), threading.Event()

    def busy(conn: apsw.Connection) -> None:
        entered.set()
        gate.wait()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run, busy)
            try:
                await trio.to_thread.run_sync(entered.wait)  # the store thread is busy
                yield nursery
            finally:
                gate.set()


async def test_an_urgent_call_goes_before_the_background_calls_waiting(store: Store) -> None:
    gateway = StoreGateway(store)
    order: list[str] = []
    async with store_thread_busy(gateway) as nursery:
        for n in range(3):
            nursery.start_soon(gateway.run, record, order, f"background {n}")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(gateway.run_urgent, record, order, "urgent")
        await trio.testing.wait_all_tasks_blocked()
    assert order == ["urgent", "background 0", "background 1", "background 2"]


async def test_a_flood_of_urgent_calls_lets_background_calls_through(store: Store) -> None:
    """After URGENT_IN_A_ROW urgent calls in a row while background work waits, one
    background call runs."""
    gateway = StoreGateway(store)
    order: list[str] = []
    limit = store_queue.URGENT_IN_A_ROW
    async with store_thread_busy(gateway) as nursery:
        for n in range(2):
            nursery.start_soon(gateway.run, record, order, f"b{n}")
            await trio.testing.wait_all_tasks_blocked()
        for n in range(2 * limit + 1):
            nursery.start_soon(gateway.run_urgent, record, order, f"u{n}")
            await trio.testing.wait_all_tasks_blocked()
    urgent = [f"u{n}" for n in range(2 * limit + 1)]
    assert order == [*urgent[:limit], "b0", *urgent[limit : 2 * limit], "b1", urgent[-1]]
