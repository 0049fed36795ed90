"""The service's start-up pieces that need no running daemon (the whole daemon is in
tests/e2e)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from uuid import uuid4

import attrs
import pytest
import trio
import trio.testing

from daemon.core.automations import Automation
from daemon.core.config import StoreConfig
from daemon.core.events import ReceivedEvent, parse_incoming_event
from daemon.engine.engine import BatchOutcome, Engine
from daemon.runtime.evaluator import BatchProgress, run_evaluator
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.service import InboxPump, open_store
from daemon.wire.submission import Submission
from store.connection import Connection
from store.db import WRITER_CACHE_KIB, Store
from store.events import inbox_size, push_inbox
from tests.support.evaluator_doubles import NOW, fixed_clock
from tests.support.firing_lines import FiringLines, watching


@pytest.mark.parametrize(("mib", "kib"), [(None, WRITER_CACHE_KIB), (3, 3 * 1024)])
def test_the_writer_gets_the_configured_page_cache(
    tmp_path: Path, mib: int | None, kib: int
) -> None:
    settings = StoreConfig(path=tmp_path / "t.db")
    if mib is not None:
        settings = settings.model_copy(update={"page_cache_mib": mib})
    store = open_store(settings)
    try:
        assert store.conn.execute("PRAGMA cache_size").fetchone() == (-kib,)
    finally:
        store.close()


# --- the inbox pump leaves trigd's own events to the evaluator's batches -----------------


@attrs.define
class CountingEngine:
    """The real engine, counting the transactions it runs: the inbox pump's hold no
    received events."""

    inner: Engine
    batches: list[int] = attrs.Factory(list)

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        self.batches.append(len(events))
        return self.inner.process_batch(conn, events, now)

    def rolled_back(self) -> None:
        self.inner.rolled_back()


def own_event() -> ReceivedEvent:
    return parse_incoming_event(
        {
            "id": str(uuid4()),
            "occurred": "2026-11-23T09:59:00Z",
            "event": "prefect.automation.action.executed",
            "resource": {"prefect.resource.id": "prefect.automation.x"},
        },
        NOW,
    )


def push_own_event(conn: Connection) -> None:
    with conn:
        push_inbox(conn, [own_event()])


def queued(conn: Connection) -> int:
    return inbox_size(conn)


PUMP_DELAY = timedelta(milliseconds=20)


@attrs.define(eq=False)
class Resolved:
    """A ReplySink that says when its submission is resolved."""

    done: trio.Event = attrs.Factory(trio.Event)

    def resolved(self, submission: Submission, error: str | None) -> None:
        submission.done = True
        submission.error = error
        self.done.set()


async def test_the_pump_leaves_the_inbox_to_an_evaluator_batch_committed_within_its_delay(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    gateway = StoreGateway(store)
    engine = CountingEngine(Engine())
    progress = BatchProgress()
    pump = InboxPump(gateway, engine, fixed_clock, progress=progress, delay=PUMP_DELAY)
    send, receive = trio.open_memory_channel[Submission](10)
    sink = Resolved()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await nursery.start(
                partial(
                    run_evaluator,
                    gateway,
                    engine,
                    receive,
                    clock=fixed_clock,
                    batch_max=10,
                    progress=progress,
                )
            )
            await gateway.run(push_own_event)
            pump.wake()  # as the sender does after committing a webhook's result
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait(Submission(own_event(), sink))  # a client's event
            await sink.done.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert await gateway.run(queued) == 0  # the evaluator's batch drained it
            nursery.cancel_scope.cancel()
    assert engine.batches == [1]  # and the pump made no transaction of its own


async def test_with_no_client_events_the_pump_drains_after_its_delay(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    gateway = StoreGateway(store)
    engine = CountingEngine(Engine())
    pump = InboxPump(gateway, engine, fixed_clock, progress=BatchProgress(), delay=PUMP_DELAY)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await gateway.run(push_own_event)
            pump.wake()
            await trio.testing.wait_all_tasks_blocked()
            assert await gateway.run(queued) == 1  # waiting for an evaluator batch
            mock_clock.jump(PUMP_DELAY.total_seconds())
            while engine.batches != [0]:
                await trio.testing.wait_all_tasks_blocked()
                await gateway.run(queued)
            assert await gateway.run(queued) == 0
            nursery.cancel_scope.cancel()


async def test_a_firing_the_pump_commits_is_logged_after_its_commit(
    store: Store, db_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """An automation reacting to trigd's own events fires in the pump's transaction: its
    line is written on the trio thread once that transaction has committed."""
    reacting = Automation.model_validate(
        {
            "name": "action watcher",
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": ["prefect.automation.action.executed"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [{"type": "do-nothing"}],
        }
    )
    engine = Engine()
    engine.load_automations(store.conn, [reacting], NOW)
    gateway = StoreGateway(store)
    pump = InboxPump(gateway, engine, fixed_clock)
    with watching(FiringLines(db_path, store.conn)) as witness, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pump.run)
            await gateway.run(push_own_event)
            pump.wake()
            while not witness.lines:
                await trio.testing.wait_all_tasks_blocked()
                await gateway.run(queued)
            nursery.cancel_scope.cancel()
    [line] = witness.lines
    assert line.message.startswith("automation 'action watcher' fired: event trigger ")
    assert (line.main_thread, line.in_transaction, line.committed_rows) == (True, False, 1)
