"""Store trouble never ends the daemon (docs/OPERATIONS.md#store-trouble): another connection holds
the write lock (``BEGIN IMMEDIATE``) past the busy timeout, and the sender, the inbox pump and a
SIGHUP reload each log the cause, keep what they have, and carry on once the lock is let go.

Real SQLite files, a real receiver on 127.0.0.1, the real daemon as a subprocess where
the failure was process-level. In-process tests shorten the busy timeout of their own
writer connection (apsw's setter) so that a locked store fails fast; the daemon keeps
``store.db.BUSY_TIMEOUT_MS``, so its tests hold the lock a little longer than that.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing

from daemon.cli.emit import emit, read_events
from daemon.core.automations import load_automation_files
from daemon.core.clock import to_us
from daemon.engine.engine import Engine
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.service import InboxPump, reload_automations
from daemon.runtime.store_trouble import CURRENT_BOARD, Backoff, TroubleBoard
from store import outbox
from store.automations import loaded_automations
from store.connection import Connection
from store.db import BUSY_TIMEOUT_MS, Store
from store.events import inbox_size, push_inbox
from tests.support.daemon_process import (
    Daemon,
    burst_automation,
    pressure,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.sender_harness import start, webhook
from tests.support.webhook_receiver import (
    T0,
    JumpingClock,
    Receiver,
    Reply,
    Request,
    outbox_row,
    run_receiver,
    triggering_event,
)

LOCK_HELD = BUSY_TIMEOUT_MS / 1000 + 1.5  # seconds: past the daemon's busy timeout
"""How long the daemon tests hold the write lock: long enough that a writer waiting on it
gives up with BusyError."""


@contextmanager
def write_lock(path: Path) -> Iterator[apsw.Connection]:
    """Another connection holding ``BEGIN IMMEDIATE``: every other writer waits out its busy
    timeout and then gets ``apsw.BusyError``, until this lets go (rolling back, unless the
    holder committed what it wrote)."""
    other = apsw.Connection(str(path))
    try:
        other.set_busy_timeout(10_000)  # the daemon may be mid-commit
        other.execute("BEGIN IMMEDIATE")
        try:
            yield other
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")
    finally:
        other.close()


def statuses(path: Path) -> list[str]:
    """Every outbox row's status, read as `trigd status` would (read-only)."""
    reader = Store.open_readonly(path)
    try:
        return [str(r[0]) for r in reader.conn.execute("SELECT status FROM outbox ORDER BY id")]
    finally:
        reader.close()


async def until_statuses(path: Path, expected: list[str]) -> None:
    """Poll the database (bound it with the test's fail_after)."""
    while statuses(path) != expected:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def emit_one(daemon: Daemon, pump: str = "pump.7") -> None:
    """One event, acknowledged (in process: no `trigd emit` start-up per event)."""
    assert await emit(daemon.url, None, list(read_events(pressure(pump)))) == (1, [])


def replies(*scripted: Reply) -> Any:
    """A handler answering with these replies in turn (the last one repeats)."""
    queue = list(scripted)

    async def handler(request: Request) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


# --- the daemon, as a process --------------------------------------------------------------


@pytest.mark.slow
async def test_daemon_outlives_a_locked_store_when_a_retry_falls_due(tmp_path: Path) -> None:
    """The reported crash: a retry falls due while another process holds the write lock
    past the busy timeout. The sender's claim is refused; trigd logs it, stays up, and
    delivers once the lock is gone."""
    db = tmp_path / "trigd.db"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(
                run_receiver, replies(Reply(429, {"Retry-After": "2"}), Reply(200))
            )
            automations = write_automations(
                tmp_path, [burst_automation(receiver.url(), threshold=1)]
            )
            # an hourly sweeper: no pass queues up in the store thread while it is locked
            config = write_config(tmp_path, [automations], triggers={"proactive_granularity": "1h"})
            async with running_daemon(config) as daemon:
                await emit_one(daemon)
                first = await receiver.next_request()
                await until_statuses(db, ["pending"])  # the 429 is recorded; retry in 2 s
                with write_lock(db):
                    await daemon.wait_for_log("store trouble while claiming due deliveries")
                    assert "BusyError: database is locked" in daemon.log
                    assert daemon.process.poll() is None
                retried = await receiver.next_request()
                assert retried.headers["webhook-id"] == first.headers["webhook-id"]
                await until_statuses(db, ["delivered"])
                await daemon.wait_for_log("claiming due deliveries went through")
                assert daemon.log.count("store trouble while claiming") == 1
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_start_up_waits_for_a_store_another_process_has_locked(
    tmp_path: Path,
) -> None:
    db = tmp_path / "trigd.db"
    Store.open(db).close()  # opening it again needs the write lock for a moment
    automations = write_automations(tmp_path, [burst_automation("http://127.0.0.1:9/hook")])
    config = write_config(tmp_path, [automations])
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            locked = trio.Event()

            async def hold_the_lock() -> None:
                with write_lock(db):
                    locked.set()
                    await trio.sleep(LOCK_HELD)

            nursery.start_soon(hold_the_lock)
            await locked.wait()
            async with running_daemon(config) as daemon:  # listening once the lock is gone
                assert "store trouble while opening the database" in daemon.log
                assert "opening the database went through" in daemon.log
                assert "Traceback" not in daemon.log
                assert stored_names(db) == {"pump pressure burst"}
                assert await daemon.stop() == 0


async def test_sighup_while_the_store_is_locked_keeps_the_old_automations(
    tmp_path: Path,
) -> None:
    """A reload the store refuses is logged and the old set stays; the next SIGHUP, once
    the lock is gone, swaps the new set in."""
    db = tmp_path / "trigd.db"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, replies(Reply(200)))
            automations = write_automations(
                tmp_path, [burst_automation(receiver.url("/first"), threshold=1)]
            )
            config = write_config(tmp_path, [automations], triggers={"proactive_granularity": "1h"})
            async with running_daemon(config) as daemon:
                second = [burst_automation(receiver.url("/second"), name="second", threshold=1)]
                automations.write_text(json.dumps(second))
                with write_lock(db):
                    daemon.send(signal.SIGHUP)
                    await daemon.wait_for_log("reload failed, keeping the automations")
                    assert "BusyError: database is locked" in daemon.log
                assert daemon.process.poll() is None
                await emit_one(daemon)
                assert (await receiver.next_request()).target == "/first"
                daemon.send(signal.SIGHUP)
                await daemon.wait_for_log("reloaded 1 automations")
                await emit_one(daemon, "pump.8")
                assert (await receiver.next_request()).target == "/second"
                assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()


# --- the sender, the inbox pump and the reload, in process --------------------------------

FAST_BUSY_MS = 100  # the in-process writer's busy timeout: a locked store refuses quickly
EXECUTED = "prefect.automation.action.executed"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "trigd.db", synchronous="normal")
    opened.conn.set_busy_timeout(FAST_BUSY_MS)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


async def until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Until a record containing `text` was logged (bound it with the test's fail_after)."""
    while not any(text in message for message in caplog.messages):  # noqa: ASYNC110
        await trio.sleep(0.01)


async def settled(gateway: StoreGateway) -> None:
    """Until every task is idle and the store calls they made have returned: each round
    lets the tasks queue their next call, then waits behind it in the gateway's order."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()
        await gateway.run(lambda conn: None)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_sender_waits_out_a_locked_store_to_claim(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = await timed_nursery.start(run_receiver, replies(Reply(200)))
    harness = await start(timed_nursery, store)
    await settled(harness.gateway)  # the start-up release and first claim, before the lock
    triggered = webhook(receiver)
    with write_lock(store.path) as other:
        # the row becomes visible when the lock goes: the sender sees nothing before
        outbox.enqueue(other, [outbox_row(triggered)])
        harness.sender.notify()
        await until_logged(caplog, "store trouble while claiming due deliveries")
        await trio.sleep(0.5)  # claims keep being refused meanwhile
        other.execute("COMMIT")
    event = await harness.next_event()
    assert event.event == EXECUTED
    assert len(receiver.requests) == 1
    assert statuses(store.path) == ["delivered"]
    [error] = errors(caplog)  # once per episode, however many claims were refused
    assert "BusyError: database is locked" in error
    assert any("claiming due deliveries went through" in m for m in caplog.messages)


async def test_sender_starts_while_the_store_is_locked(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The rows a previous process left in flight are released once the store lets it."""
    receiver = await timed_nursery.start(run_receiver, replies(Reply(200)))
    triggered = webhook(receiver)
    with store.conn:
        outbox.enqueue(store.conn, [outbox_row(triggered)])
        outbox.claim(
            store.conn, to_us(T0), to_us(T0 + timedelta(seconds=60)), limit=1, per_endpoint=1
        )
    with write_lock(store.path):
        harness = await start(timed_nursery, store)  # started without waiting for the store
        await until_logged(caplog, "store trouble while releasing the deliveries left in flight")
    event = await harness.next_event()
    assert event.event == EXECUTED
    assert [a.error for a in harness.attempts(triggered)] == [outbox.LEASE_EXPIRED_ERROR, None]
    assert len(errors(caplog)) == 1


async def test_a_result_the_store_refused_is_committed_once_it_clears(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The request was made and answered 200 while the store is locked: the delivery keeps
    its lease (its slot went back when the answer came) and commits its result when the
    lock goes, not a send again."""
    locked = ExitStack()

    async def lock_then_answer(request: Request) -> Reply:
        locked.enter_context(write_lock(store.path))
        return Reply(200)

    receiver = await timed_nursery.start(run_receiver, lock_then_answer)
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    with locked:
        await harness.enqueue(triggered)
        await until_logged(caplog, "store trouble while recording the results of deliveries")
        await trio.sleep(0.5)
        assert statuses(store.path) == ["in_flight"]
        assert harness.sender.in_flight == 0
    event = await harness.next_event()
    assert event.event == EXECUTED
    assert len(receiver.requests) == 1
    assert [a.status_code for a in harness.attempts(triggered)] == [200]
    assert statuses(store.path) == ["delivered"]
    assert harness.sender.in_flight == 0
    # once for the result; the claim loop, if it ran while locked, logs its own episode once
    logged = errors(caplog)
    assert len([e for e in logged if "recording the results of deliveries" in e]) == 1
    assert len([e for e in logged if "claiming due deliveries" in e]) <= 1
    assert len(logged) <= 2


async def test_a_stale_result_never_overwrites_the_row_sent_again(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit that waits out store trouble past its lease finds the row released and
    sent again: its result (a 500, due for retry) is dropped, and the newer attempt's 200
    is what the row records."""
    clock = JumpingClock()
    locked = ExitStack()
    calls = 0

    async def handler(request: Request) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            locked.enter_context(write_lock(store.path))
            clock.now = T0 + timedelta(minutes=2)  # the 60 s lease runs out meanwhile
            return Reply(500)
        if calls == 2:
            await trio.sleep(1)  # the stale commit is retried meanwhile
        return Reply(200)

    receiver = await timed_nursery.start(run_receiver, handler)
    harness = await start(timed_nursery, store, clock)
    triggered = webhook(receiver)
    with locked:
        await harness.enqueue(triggered)
        await until_logged(caplog, "store trouble while recording the results of deliveries")
        await trio.sleep(0.4)  # the stale commit is refused again and backs off 0.5 s
    harness.sender.notify()  # a claim comes first: releases the row and sends it again
    await until_logged(caplog, "lease expired during the attempt")
    event = await harness.next_event()
    assert event.event == EXECUTED
    assert len(receiver.requests) == 2
    assert [a.error for a in harness.attempts(triggered)] == [outbox.LEASE_EXPIRED_ERROR, None]
    assert statuses(store.path) == ["delivered"]


async def test_inbox_pump_waits_out_a_locked_store(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = StoreGateway(store)
    engine = Engine()
    own_event = triggering_event()

    def push(conn: Connection) -> None:
        with conn:
            push_inbox(conn, [own_event])

    await gateway.run(push)
    pump = InboxPump(gateway, engine, lambda: T0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            with write_lock(store.path):
                pump.wake()
                await until_logged(caplog, "store trouble while evaluating trigd's own events")
                await trio.sleep(0.5)
            await until_logged(caplog, "evaluating trigd's own events went through")
            nursery.cancel_scope.cancel()
    reader = Store.open_readonly(store.path)
    try:
        assert inbox_size(reader.conn) == 0
        stored = [str(r[0]) for r in reader.conn.execute("SELECT id FROM events")]
    finally:
        reader.close()
    assert stored == [str(own_event.id)]
    [error] = errors(caplog)  # no traceback of a "bug" per refused drain
    assert "BusyError: database is locked" in error


async def test_reload_the_store_refuses_keeps_the_old_set(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In memory and in the database: the engine swaps only after its commit."""
    path = write_automations(tmp_path, [burst_automation("http://127.0.0.1:9/first")])
    gateway = StoreGateway(store)
    engine = Engine()
    await gateway.run(engine.load_automations, load_automation_files([path]), T0)
    names = {a.name for a in engine.automations.values()}
    path.write_text(json.dumps([burst_automation("http://127.0.0.1:9/second", name="second")]))
    with trio.fail_after(10):
        with write_lock(store.path):
            assert await reload_automations(gateway, engine, [str(path)], lambda: T0) is False
        assert {a.name for a in engine.automations.values()} == names
        assert stored_names(store.path) == names
        assert "reload failed, keeping the automations loaded before" in errors(caplog)[0]
        assert await reload_automations(gateway, engine, [str(path)], lambda: T0) is True
    assert {a.name for a in engine.automations.values()} == {"second"}
    assert stored_names(store.path) == {"second"}


def stored_names(path: Path) -> set[str]:
    reader = Store.open_readonly(path)
    try:
        return {row.name for row in loaded_automations(reader.conn)}
    finally:
        reader.close()


async def test_sweeper_waits_out_a_locked_store_and_stores_its_counters_after(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    from daemon.core.counters import META_KEY, CounterSource
    from daemon.runtime.ingest import IngestStats
    from daemon.runtime.sweeper import SweepSettings, run_sweeper
    from store.events import read_meta

    gateway = StoreGateway(store)
    settings = SweepSettings(timedelta(seconds=0.05), timedelta(days=7), timedelta(days=7))
    stats = IngestStats(rejected=3)
    counters = CounterSource(4242, T0, {"ingest": stats})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with write_lock(store.path):
                await nursery.start(
                    partial(
                        run_sweeper,
                        gateway,
                        Engine(),
                        settings,
                        clock=lambda: T0,
                        counters=counters,
                    ),
                )
                await until_logged(caplog, "store trouble while running the periodic pass")
                await trio.sleep(0.5)  # several refused passes: one error logged
            await until_logged(caplog, "running the periodic pass went through")
            nursery.cancel_scope.cancel()
    [error] = errors(caplog)  # no traceback of a "bug" per refused pass
    assert "BusyError: database is locked" in error
    reader = Store.open_readonly(store.path)
    try:
        stored = read_meta(reader.conn, META_KEY)
    finally:
        reader.close()
    assert stored is not None
    snapshot = json.loads(stored)
    assert (snapshot["pid"], snapshot["ingest"]["rejected"]) == (4242, 3)


async def test_a_backoff_reports_its_trouble_to_the_board_until_it_clears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What /api/ready reads: every Backoff of the tasks, through the board the service
    sets in CURRENT_BOARD before starting them; none set, a Backoff reports nothing."""
    unseen = Backoff(logging.getLogger("test"), "before any board")
    await unseen.wait(apsw.BusyError("database is locked"))
    board = TroubleBoard()
    token = CURRENT_BOARD.set(board)
    try:
        first = Backoff(logging.getLogger("test"), "committing received events")
        second = Backoff(logging.getLogger("test"), "claiming due deliveries")
        await first.wait(apsw.FullError("database or disk is full"))
        await second.wait(apsw.BusyError("database is locked"))
        assert board.reasons() == [
            "the store refuses claiming due deliveries: BusyError: database is locked",
            "the store refuses committing received events: FullError: database or disk is full",
        ]
        first.cleared()
        assert board.reasons() == [
            "the store refuses claiming due deliveries: BusyError: database is locked"
        ]
        second.cleared()
        assert board.reasons() == []
    finally:
        CURRENT_BOARD.reset(token)
