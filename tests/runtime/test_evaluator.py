"""The evaluator task: group commit through the gateway, resolution after commit, the
retry of a poisonous batch event by event, waiting out store trouble, and shutdown.

Real SQLite files, the real Engine; wrappers around it only add what a test needs to
provoke (a gate that holds the store thread, a failure for one event id, a full disk).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from uuid import UUID, uuid4

import apsw
import attrs
import pytest
import trio
import trio.testing

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent, parse_incoming_event
from daemon.core.log_throttle import LogLimits
from daemon.engine.engine import BatchOutcome, Engine
from daemon.runtime.evaluator import EvaluatorStats, run_evaluator
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.read_pacing import ReadPacing
from daemon.wire.submission import Submission
from store.connection import Connection
from store.db import Store
from tests.support.evaluator_doubles import (
    NOW,
    GatedEngine,
    TroubledEngine,
    fixed_clock,
    stored_ids,
)
from tests.support.firing_lines import FiringLines, watching


def make_event(event_id: UUID | None = None, name: str = "pump.pressure.high") -> ReceivedEvent:
    return parse_incoming_event(
        {
            "id": str(event_id or uuid4()),
            "occurred": "2026-11-23T09:59:00Z",
            "event": name,
            "resource": {"prefect.resource.id": "pump.7"},
        },
        NOW,
    )


@attrs.define(eq=False)
class Recorder:
    """A ReplySink that remembers outcomes in the order they were resolved."""

    outcomes: list[tuple[UUID, str | None]] = attrs.Factory(list)
    db_path: Path | None = None
    committed_when_resolved: list[bool] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)

    def resolved(self, submission: Submission, error: str | None) -> None:
        self.changed.set()
        submission.done = True
        submission.error = error
        self.outcomes.append((submission.event.id, error))
        if self.db_path is not None:
            self.committed_when_resolved.append(
                str(submission.event.id) in stored_ids(self.db_path)
            )


@attrs.define
class PoisonEngine:
    """The real engine, except that one event id makes processing blow up."""

    inner: Engine
    poison: UUID

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        outcomes = self.inner.process_batch(conn, events, now)  # writes, then fails: rollback
        if any(event.id == self.poison for event in events):
            raise RuntimeError("boom")
        return outcomes

    def rolled_back(self) -> None:
        self.inner.rolled_back()


@pytest.fixture
def gateway(store: Store) -> StoreGateway:
    return StoreGateway(store)


async def test_queued_submissions_commit_as_one_batch_then_resolve(
    gateway: StoreGateway, db_path: Path
) -> None:
    sink = Recorder(db_path=db_path)
    stats = EvaluatorStats()
    send, receive = trio.open_memory_channel[Submission](10)
    events = [make_event() for _ in range(5)]
    with trio.fail_after(10):
        for event in events:
            send.send_nowait(Submission(event, sink))
        send.close()
        await run_evaluator(
            gateway, Engine(), receive, clock=fixed_clock, batch_max=100, stats=stats
        )
    assert [outcome for outcome in sink.outcomes] == [(e.id, None) for e in events]
    assert sink.committed_when_resolved == [True] * 5
    assert (stats.batches, stats.largest_batch, stats.events) == (1, 5, 5)


async def test_batch_max_splits_a_backlog(gateway: StoreGateway, db_path: Path) -> None:
    sink = Recorder()
    stats = EvaluatorStats()
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        for _ in range(7):
            send.send_nowait(Submission(make_event(), sink))
        send.close()
        await run_evaluator(gateway, Engine(), receive, clock=fixed_clock, batch_max=3, stats=stats)
    assert (stats.batches, stats.largest_batch, stats.events) == (3, 3, 7)
    assert len(stored_ids(db_path)) == 7


async def test_group_commit_does_not_wait_for_a_full_batch(
    gateway: StoreGateway, db_path: Path
) -> None:
    sink = Recorder()
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_evaluator(
                    gateway,
                    Engine(),
                    receive,
                    clock=fixed_clock,
                    batch_max=100,
                    task_status=task_status,
                )
            )
            lone = Submission(make_event(), sink)
            await send.send(lone)
            await sink.changed.wait()
            assert lone.done
            assert str(lone.event.id) in stored_ids(db_path)
            await send.aclose()


async def test_duplicates_are_resolved_as_committed_and_stored_once(
    gateway: StoreGateway, db_path: Path
) -> None:
    sink = Recorder()
    stats = EvaluatorStats()
    twin = uuid4()
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        for event in (make_event(twin), make_event(twin), make_event()):
            send.send_nowait(Submission(event, sink))
        send.close()
        await run_evaluator(
            gateway, Engine(), receive, clock=fixed_clock, batch_max=100, stats=stats
        )
    assert [error for _, error in sink.outcomes] == [None, None, None]
    assert stats.duplicates == 1
    assert len(stored_ids(db_path)) == 2


async def test_a_poisonous_event_is_refused_alone(gateway: StoreGateway, db_path: Path) -> None:
    sink = Recorder()
    stats = EvaluatorStats()
    events = [make_event() for _ in range(4)]
    poison = events[2].id
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        for event in events:
            send.send_nowait(Submission(event, sink))
        send.close()
        await run_evaluator(
            gateway,
            PoisonEngine(Engine(), poison),
            receive,
            clock=fixed_clock,
            batch_max=100,
            stats=stats,
        )
    errors = dict(sink.outcomes)
    assert errors[poison] == "internal error: RuntimeError('boom')"
    assert [errors[e.id] for e in events if e.id != poison] == [None, None, None]
    assert [event_id for event_id, _ in sink.outcomes] == [e.id for e in events]
    assert stored_ids(db_path) == {str(e.id) for e in events if e.id != poison}
    assert stats.internal_errors == 1


async def test_store_trouble_holds_the_batch_until_the_store_recovers(
    gateway: StoreGateway, db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Recorder()
    stats = EvaluatorStats()
    events = [make_event() for _ in range(3)]
    engine = TroubledEngine(Engine(), failures=4)
    send, receive = trio.open_memory_channel[Submission](10)
    for event in events:
        send.send_nowait(Submission(event, sink))
    send.close()
    start = trio.current_time()
    await run_evaluator(gateway, engine, receive, clock=fixed_clock, batch_max=100, stats=stats)
    # Retried after 0.25 + 0.5 + 1 + 2 virtual seconds, as one batch every time (a lock
    # does not go away by writing less).
    assert trio.current_time() - start == pytest.approx(3.75)
    assert engine.calls == 5
    assert stats.store_retries == 4
    assert [error for _, error in sink.outcomes] == [None, None, None]
    assert stored_ids(db_path) == {str(e.id) for e in events}


async def test_nothing_is_resolved_while_the_store_is_down(
    gateway: StoreGateway, db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Recorder()
    engine = TroubledEngine(Engine(), failures=10**9, trouble=apsw.FullError)
    send, receive = trio.open_memory_channel[Submission](10)
    send.send_nowait(Submission(make_event(), sink))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_evaluator(gateway, engine, receive, clock=fixed_clock, batch_max=100)
        )
        # Virtual time: the calls happen in a thread, and autojump would leap to any
        # single far deadline while the thread runs; so step a second at a time.
        while engine.calls < 8:  # noqa: ASYNC110
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sink.outcomes == []
    # the backoff grows to RETRY_MAX_DELAY and stays there
    assert trio.current_time() >= 0.25 + 0.5 + 1 + 2 + 4 + 8 + 10
    assert stored_ids(db_path) == set()


async def test_cancellation_finishes_the_commit_in_flight(
    gateway: StoreGateway, db_path: Path
) -> None:
    sink = Recorder()
    engine = GatedEngine(Engine())
    events = [make_event() for _ in range(3)]
    send, receive = trio.open_memory_channel[Submission](10)
    finished = trio.Event()

    async def evaluate(scope: trio.CancelScope) -> None:
        with scope:
            await run_evaluator(gateway, engine, receive, clock=fixed_clock, batch_max=100)
        finished.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            evaluator_scope = trio.CancelScope()
            nursery.start_soon(evaluate, evaluator_scope)
            for event in events:
                send.send_nowait(Submission(event, sink))
            await trio.to_thread.run_sync(engine.entered.wait)
            evaluator_scope.cancel()  # shutdown while the batch is in the store thread
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
            assert stored_ids(db_path) == set()
            engine.gate.set()
            await finished.wait()
    assert stored_ids(db_path) == {str(e.id) for e in events}
    assert [error for _, error in sink.outcomes] == [None, None, None]


async def test_bad_batch_max_is_refused(gateway: StoreGateway) -> None:
    _, receive = trio.open_memory_channel[Submission](1)
    with pytest.raises(ValueError, match="batch_max"):
        await run_evaluator(gateway, Engine(), receive, clock=fixed_clock, batch_max=0)


def bulky_event(blob: str = "x" * 3000) -> ReceivedEvent:
    """An event taking most of a page of its own, so that a few pages more or less decide
    how many of a batch fit in the database."""
    return parse_incoming_event(
        {
            "id": str(uuid4()),
            "occurred": "2026-11-23T09:59:00Z",
            "event": "pump.pressure.high",
            "resource": {"prefect.resource.id": "pump.7"},
            "payload": {"blob": blob},
        },
        NOW,
    )


def page_count(conn: apsw.Connection) -> int:
    row = conn.execute("PRAGMA page_count").fetchone()
    assert row is not None
    return int(row[0])


def cap_pages(conn: apsw.Connection, pages: int) -> None:
    """SQLite's own size limit: past it a write fails as on a full disk (SQLITE_FULL)."""
    conn.execute(f"PRAGMA max_page_count = {pages:d}")


async def test_a_batch_too_big_for_the_disk_commits_what_fits_and_holds_the_rest(
    gateway: StoreGateway, db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a partial free, the part of a batch that fits is committed and acknowledged
    (halves, then quarters...), in order; the first event that does not fit even alone is
    neither acknowledged nor refused, and neither are the ones behind it, until there is
    room; then every event is stored once and resolved once."""
    sink = Recorder(db_path=db_path)
    stats = EvaluatorStats()
    engine = Engine()
    events = [bulky_event() for _ in range(16)]
    await gateway.run(lambda conn: engine.process_batch(conn, [bulky_event()], NOW))
    # room for a few of the 16 events (each takes about a page), not for all of them
    await gateway.run(lambda conn: cap_pages(conn, page_count(conn) + 8))
    send, receive = trio.open_memory_channel[Submission](100)
    for event in events:
        send.send_nowait(Submission(event, sink))
    send.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_evaluator(
                gateway, engine, receive, clock=fixed_clock, batch_max=100, stats=stats
            )
        )
        # a single event is retried with backoff while it does not fit
        while stats.store_retries < 20:  # noqa: ASYNC110  (15 splits at most, then singles)
            await trio.sleep(1)
        held = len(sink.outcomes)
        assert 0 < held < len(events)
        assert sink.outcomes == [(e.id, None) for e in events[:held]]
        assert all(sink.committed_when_resolved)
        assert stored_ids(db_path) >= {str(e.id) for e in events[:held]}
        assert not stored_ids(db_path) & {str(e.id) for e in events[held:]}
        await gateway.run(lambda conn: cap_pages(conn, 1 << 30))  # space freed
    assert sink.outcomes == [(e.id, None) for e in events]
    assert all(sink.committed_when_resolved)
    assert stored_ids(db_path) >= {str(e.id) for e in events}
    assert stats.internal_errors == 0


@attrs.define
class PoisonNameEngine:
    """The real engine, except that events named `poison` make processing blow up."""

    inner: Engine
    poison: str = "pump.poison"

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        outcomes = self.inner.process_batch(conn, events, now)
        if any(event.event == self.poison for event in events):
            raise RuntimeError("boom " + "x" * 200)  # a long message, as a real one can be
        return outcomes

    def rolled_back(self) -> None:
        self.inner.rolled_back()


@pytest.fixture
def jumpable_clock() -> trio.testing.MockClock:
    """Runs at the wall clock's pace (waits for the store thread take real time) until a
    test jumps it forward."""
    return trio.testing.MockClock(rate=1.0)


async def test_lines_one_event_causes_are_rate_limited(
    gateway: StoreGateway,
    db_path: Path,
    jumpable_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream of poisonous events: every one is refused, but only `log_limits.burst` of them
    are logged (with their traceback) per window; the next window starts with a count of
    the ones left out."""
    sink = Recorder()
    stats = EvaluatorStats()
    send, receive = trio.open_memory_channel[Submission](100)
    poisonous = [make_event(name="pump.poison") for _ in range(12)]
    for event in poisonous:
        send.send_nowait(Submission(event, sink))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_evaluator(
                gateway,
                PoisonNameEngine(Engine()),
                receive,
                clock=fixed_clock,
                batch_max=5,
                stats=stats,
                log_limits=LogLimits(burst=3, window=60),
            )
        )
        while len(sink.outcomes) < 12:  # noqa: ASYNC110
            await trio.sleep(0.01)
        refused = [r for r in caplog.records if "could not be processed" in r.getMessage()]
        assert len(refused) == 3
        assert all(r.exc_info is not None for r in refused)
        failed = [r for r in caplog.records if "retrying them one by one" in r.getMessage()]
        assert len(failed) == 3  # batches of 5, 5 and 2
        caplog.clear()
        jumpable_clock.jump(60)
        send.send_nowait(Submission(make_event(name="pump.poison"), sink))
        while len(sink.outcomes) < 13:  # noqa: ASYNC110
            await trio.sleep(0.01)
        send.close()
    messages = [r.getMessage() for r in caplog.records]
    left_out = re.compile(
        r"9 lines left out in the last 6[0-9.]*s \(at most 3 per 60s\): "
        "events refused as internal errors"
    )
    assert [m for m in messages if left_out.fullmatch(m)]
    assert sum("could not be processed" in m for m in messages) == 1
    assert [error for _, error in sink.outcomes] == [
        "internal error: RuntimeError('boom " + "x" * 200 + "')"
    ] * 13
    assert stats.internal_errors == 13


# --- the commit linger ---------------------------------------------------------------------


@attrs.define
class TimedEngine:
    """The real engine, recording each batch's size and the (virtual) time it was taken, in
    microseconds."""

    inner: Engine
    batches: list[tuple[int, int]] = attrs.Factory(list)

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        self.batches.append((len(events), (now - NOW) // timedelta(microseconds=1)))
        return self.inner.process_batch(conn, events, now)

    def rolled_back(self) -> None:
        self.inner.rolled_back()


def us(seconds: float) -> int:
    return round(seconds * 1e6)


def virtual_clock() -> datetime:
    """The wall clock the engine gets: NOW plus trio's (mock) time."""
    return NOW + timedelta(seconds=trio.current_time())


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Virtual time that only moves when a test jumps it."""
    return trio.testing.MockClock()


async def settle_until(sink: Recorder, count: int) -> None:
    """Until ``count`` submissions are resolved (the store thread takes real time, the
    frozen clock does not move meanwhile)."""
    while len(sink.outcomes) < count:
        sink.changed = trio.Event()
        await sink.changed.wait()


def lingering(
    gateway: StoreGateway,
    engine: TimedEngine,
    receive: trio.MemoryReceiveChannel[Submission],
    *,
    batch_max: int = 100,
    linger_events: int = 64,
) -> Callable[[], Awaitable[None]]:
    """The evaluator with a 5 ms commit linger on the virtual clock, to start in a nursery."""
    return lambda: run_evaluator(
        gateway,
        engine,
        receive,
        clock=virtual_clock,
        batch_max=batch_max,
        linger=timedelta(milliseconds=5),
        linger_events=linger_events,
    )


async def test_events_arriving_within_the_linger_share_one_commit(
    gateway: StoreGateway, db_path: Path, frozen_clock: trio.testing.MockClock
) -> None:
    """The first event opens a 5 ms window; the events arriving in it join its batch, which
    commits when the window ends. The next batch's window is shorter by the share of
    `linger_events` the last batch filled (3 of 64)."""
    sink = Recorder()
    engine = TimedEngine(Engine())
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering(gateway, engine, receive))
            start = trio.current_time()
            for _ in range(3):  # events at 0, 2 and 4 ms
                send.send_nowait(Submission(make_event(), sink))
                await trio.testing.wait_all_tasks_blocked()
                frozen_clock.jump(0.002)
            # the window ended at 5 ms, while the clock stood still at 4: the batch is
            # taken when it next moves, at 6
            await settle_until(sink, 3)
            assert engine.batches == [(3, us(start + 0.006))]
            second = trio.current_time()
            send.send_nowait(Submission(make_event(), sink))
            await trio.testing.wait_all_tasks_blocked()
            frozen_clock.jump(0.0047)  # short of 5 ms * (1 - 3/64) = 4.77 ms
            await trio.testing.wait_all_tasks_blocked()
            frozen_clock.jump(0.0001)
            await trio.testing.wait_all_tasks_blocked()
            frozen_clock.jump(0.001)  # past any window: the batch's time tells which ended it
            await settle_until(sink, 4)
            assert engine.batches[1:] == [(1, us(second + 0.0048))]
            await send.aclose()
    assert len(stored_ids(db_path)) == 4


async def test_no_linger_once_a_batch_holds_linger_events(
    gateway: StoreGateway, frozen_clock: trio.testing.MockClock
) -> None:
    """Under load the queue makes the batches: a batch that already holds `linger_events`
    commits at once, and so does the one after it, however small."""
    sink = Recorder()
    engine = TimedEngine(Engine())
    send, receive = trio.open_memory_channel[Submission](10)
    start = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering(gateway, engine, receive, linger_events=3))
            for _ in range(3):
                send.send_nowait(Submission(make_event(), sink))
            await settle_until(sink, 3)
            send.send_nowait(Submission(make_event(), sink))
            await settle_until(sink, 4)
            await send.aclose()
    assert engine.batches == [(3, us(start)), (1, us(start))]


@attrs.define
class SlowFirstBatch(TimedEngine):
    """`TimedEngine` whose first batch holds the store thread until the test lets it go:
    a commit that takes as long as the test moves the virtual clock meanwhile (a batch of
    many firings, in the daemon)."""

    entered: threading.Event = attrs.Factory(threading.Event)
    release: threading.Event = attrs.Factory(threading.Event)

    def process_batch(
        self, conn: Connection, events: Sequence[ReceivedEvent], now: datetime
    ) -> BatchOutcome:
        if not self.batches:
            self.entered.set()
            self.release.wait(10)
        return super().process_batch(conn, events, now)


@pytest.mark.parametrize(("commit", "lingers"), [(0.006, False), (0.004, True)])
async def test_the_linger_after_a_commit_is_shorter_by_its_time(
    gateway: StoreGateway, frozen_clock: trio.testing.MockClock, commit: float, lingers: bool
) -> None:
    """The events read when a commit ends may have arrived as it began: after a commit of
    the whole window (5 ms) or more the next batch commits at once; after one of 4 ms it
    lingers what is left of its window, 5 ms * (1 - 1/64) - 4 ms = 0.92 ms."""
    sink = Recorder()
    engine = SlowFirstBatch(Engine())
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering(gateway, engine, receive))
            send.send_nowait(Submission(make_event(), sink))
            await trio.testing.wait_all_tasks_blocked()
            frozen_clock.jump(0.005)  # the first batch's window
            await trio.to_thread.run_sync(engine.entered.wait, 10)
            frozen_clock.jump(commit)  # while the store thread holds its transaction
            engine.release.set()
            await settle_until(sink, 1)
            second = trio.current_time()
            send.send_nowait(Submission(make_event(), sink))
            await trio.testing.wait_all_tasks_blocked()
            if lingers:
                frozen_clock.jump(0.0009)
                await trio.testing.wait_all_tasks_blocked()
                assert len(sink.outcomes) == 1  # waiting for what is left of its window
                frozen_clock.jump(0.0001)
            await settle_until(sink, 2)
            await send.aclose()
    taken = us(second + 0.001) if lingers else us(second)
    assert engine.batches[1] == (1, taken)


async def test_the_linger_never_makes_a_batch_longer_than_batch_max(
    gateway: StoreGateway, frozen_clock: trio.testing.MockClock
) -> None:
    sink = Recorder()
    engine = TimedEngine(Engine())
    send, receive = trio.open_memory_channel[Submission](10)
    start = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering(gateway, engine, receive, batch_max=3))
            for _ in range(5):
                send.send_nowait(Submission(make_event(), sink))
                await trio.testing.wait_all_tasks_blocked()
                frozen_clock.jump(0.001)
            await settle_until(sink, 5)
            await send.aclose()
    # the second batch follows a full one: no linger
    assert engine.batches == [(3, us(start + 0.005)), (2, us(start + 0.005))]


async def test_cancellation_during_the_linger_commits_the_events_taken(
    gateway: StoreGateway, db_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sink = Recorder()
    send, receive = trio.open_memory_channel[Submission](10)
    event = make_event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_evaluator(
                gateway,
                Engine(),
                receive,
                clock=fixed_clock,
                batch_max=100,
                linger=timedelta(milliseconds=5),
            )
        )
        send.send_nowait(Submission(event, sink))
        await trio.testing.wait_all_tasks_blocked()
        assert sink.outcomes == []  # lingering
        nursery.cancel_scope.cancel()
    assert sink.outcomes == [(event.id, None)]
    assert stored_ids(db_path) == {str(event.id)}


@pytest.mark.parametrize(("linger_events", "found_resolved"), [(64, 1), (1, 0)])
async def test_readers_woken_after_a_commit_are_waited_for_only_when_no_window_follows(
    gateway: StoreGateway,
    frozen_clock: trio.testing.MockClock,
    linger_events: int,
    found_resolved: int,
) -> None:
    """A reader held off during a commit is woken at its end. When the next batch will
    linger, what it reads joins that window anyway: the evaluator resolves its batch at
    once, without scheduler passes for the reader. When it will not (the batch held
    `linger_events`), the evaluator first lets the reader hand its frames over, so they
    join the next take."""
    sink = Recorder()
    engine = GatedEngine(Engine())
    pacing = ReadPacing()
    found: list[int] = []
    send, receive = trio.open_memory_channel[Submission](10)

    async def reader() -> None:  # a connection whose event is being committed
        assert await pacing.hold() is True
        found.append(len(sink.outcomes))
        pacing.handed_over()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_evaluator(
                    gateway,
                    engine,
                    receive,
                    clock=virtual_clock,
                    batch_max=100,
                    linger=timedelta(milliseconds=5),
                    linger_events=linger_events,
                    pacing=pacing,
                )
            )
            send.send_nowait(Submission(make_event(), sink))
            await trio.testing.wait_all_tasks_blocked()
            frozen_clock.jump(0.006)  # past the window, if any
            await trio.to_thread.run_sync(engine.entered.wait)  # committing
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            engine.gate.set()
            await settle_until(sink, 1)
            await trio.testing.wait_all_tasks_blocked()
            await send.aclose()
    assert found == [found_resolved]


async def test_a_batch_queued_behind_background_store_work_commits_before_it(
    gateway: StoreGateway, db_path: Path
) -> None:
    """The store thread is busy and background calls (the sender's, the pump's...) wait:
    the evaluator's batch, queued after them, runs first, so its acks do not wait on them."""
    sink = Recorder()
    events = [make_event() for _ in range(3)]
    send, receive = trio.open_memory_channel[Submission](10)
    gate, entered = threading.Event(), threading.Event()
    seen: list[object] = []  # events stored when each background call ran

    def busy(conn: Connection) -> None:
        entered.set()
        gate.wait()

    def background(conn: Connection) -> None:
        seen.append(conn.execute("SELECT count(*) FROM events").fetchall()[0][0])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run, busy)
            await trio.to_thread.run_sync(entered.wait)  # the store thread is busy
            for _ in range(5):
                nursery.start_soon(gateway.run, background)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(
                partial(run_evaluator, gateway, Engine(), receive, clock=fixed_clock, batch_max=100)
            )
            for event in events:
                send.send_nowait(Submission(event, sink))
            await trio.testing.wait_all_tasks_blocked()  # the batch is queued too
            gate.set()
            send.close()  # the evaluator returns once its batch is committed
    assert seen == [3] * 5
    assert [error for _, error in sink.outcomes] == [None, None, None]


# --- a firing's INFO line: written once its transaction has committed ----------------------

PRESSURE_ALARM = Automation.model_validate(
    {
        "name": "pressure alarm",
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": ["pump.pressure.high"],
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "do-nothing"}],
    }
)


def alarmed_engine(store: Store) -> Engine:
    engine = Engine()
    engine.load_automations(store.conn, [PRESSURE_ALARM], NOW)
    return engine


async def test_a_batch_logs_its_firings_after_its_commit_and_its_acks(
    store: Store, gateway: StoreGateway, db_path: Path
) -> None:
    sink = Recorder()
    events = [make_event(), make_event()]
    witness = FiringLines(db_path, store.conn, note=lambda: tuple(str(i) for i, _ in sink.outcomes))
    send, receive = trio.open_memory_channel[Submission](10)
    for event in events:
        send.send_nowait(Submission(event, sink))
    send.close()
    with watching(witness), trio.fail_after(10):
        await run_evaluator(
            gateway, alarmed_engine(store), receive, clock=fixed_clock, batch_max=100
        )
    assert len(witness.lines) == 2
    for line in witness.lines:
        assert (line.main_thread, line.in_transaction, line.committed_rows) == (True, False, 1)
        assert line.noted == tuple(str(e.id) for e in events)


async def test_a_firing_rolled_back_with_its_batch_is_logged_once_after_its_own_commit(
    store: Store, gateway: StoreGateway, db_path: Path
) -> None:
    """The batch fires, then fails on its second event: rolled back, then retried one
    event per transaction. The firing that committed is logged once, after its commit
    and its ack, on the trio thread; the one rolled back never."""
    sink = Recorder()
    fired, poison = make_event(), make_event(name="pump.pressure.low")
    witness = FiringLines(db_path, store.conn, note=lambda: tuple(str(i) for i, _ in sink.outcomes))
    send, receive = trio.open_memory_channel[Submission](10)
    for event in (fired, poison):
        send.send_nowait(Submission(event, sink))
    send.close()
    with watching(witness), trio.fail_after(10):
        await run_evaluator(
            gateway,
            PoisonEngine(alarmed_engine(store), poison.id),
            receive,
            clock=fixed_clock,
            batch_max=100,
        )
    assert dict(sink.outcomes) == {
        fired.id: None,
        poison.id: "internal error: RuntimeError('boom')",
    }
    [line] = witness.lines
    assert line.message.startswith("automation 'pressure alarm' fired: event trigger ")
    assert (line.main_thread, line.in_transaction, line.committed_rows) == (True, False, 1)
    assert line.noted == (str(fired.id),)  # acknowledged first


async def test_a_firing_whose_commit_fails_is_never_logged(
    store: Store, gateway: StoreGateway, db_path: Path
) -> None:
    """A deferred foreign key makes every COMMIT that wrote an outbox row fail: the
    firing's event is refused (after the batch's retry one by one), and nothing says it
    fired; the other event commits."""
    conn = store.conn
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TEMP TABLE child (parent INTEGER REFERENCES parent (id)"
        " DEFERRABLE INITIALLY DEFERRED)"
    )
    conn.execute(
        "CREATE TEMP TRIGGER orphan AFTER INSERT ON main.outbox"
        " BEGIN INSERT INTO child VALUES (1); END"
    )
    sink = Recorder()
    fired, calm = make_event(), make_event(name="pump.pressure.low")
    witness = FiringLines(db_path, conn)
    send, receive = trio.open_memory_channel[Submission](10)
    for event in (fired, calm):
        send.send_nowait(Submission(event, sink))
    send.close()
    with watching(witness), trio.fail_after(10):
        await run_evaluator(
            gateway, alarmed_engine(store), receive, clock=fixed_clock, batch_max=100
        )
    errors = dict(sink.outcomes)
    assert errors[calm.id] is None
    assert "FOREIGN KEY constraint failed" in str(errors[fired.id])
    assert witness.lines == []
    assert stored_ids(db_path) == {str(calm.id)}
