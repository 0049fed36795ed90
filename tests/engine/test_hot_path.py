"""State the performance work added to the hot path, and what keeps it honest.

* `CausalOrdering.batch()`: seen marks held in memory until the batch ends, and the set
  of leaders with parked followers, which must never miss a leader: not across batches,
  not after a rolled-back transaction, not after a commit that failed once the batch had
  ended;
* `BatchOutcome.handed_off` and the evaluator waking the sender and the inbox pump only then;
* `store.buckets.save_bucket`, the count-only write of an unchanged window;
* `store.buckets.PendingBuckets`, the engine's bucket write-back within one unit of work:
  dropped with a failed batch, and leaving the table as writing at once would;
* the models of the events trigd queues in its inbox, kept by their JSON so that the
  batch draining them (most often the one whose firings made them) does not parse them.

Real SQLite files, fixed clocks.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import apsw
import pytest
import trio

from daemon.core.automations import Automation
from daemon.core.buckets import Bucket, EventRef
from daemon.core.events import ReceivedEvent, Resource, parse_incoming_event
from daemon.engine.engine import Engine
from daemon.engine.ordering import CausalOrdering, EventArrivedEarly
from daemon.runtime.evaluator import process_in_transaction, run_evaluator
from daemon.runtime.gateway import StoreGateway
from daemon.wire.submission import Submission
from store import buckets as buckets_store
from store import events as events_store
from store.connection import Connection
from store.db import WAL_AUTOCHECKPOINT_PAGES, WRITER_CACHE_KIB, Store

S = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW = S + timedelta(seconds=10)
RESOURCE = Resource({"prefect.resource.id": "any.thing"})


def event(name: str, seconds: float, follows: UUID | None = None) -> ReceivedEvent:
    at = S + timedelta(seconds=seconds)
    return ReceivedEvent(
        event=name, resource=RESOURCE, occurred=at, received=at, id=uuid4(), follows=follows
    )


@pytest.fixture
def ordering(store: Store) -> CausalOrdering:
    return CausalOrdering("hot", store.conn)


class Recorder:
    """Enters the ordering for each event, as the reactive evaluation does."""

    def __init__(self, ordering: CausalOrdering) -> None:
        self.ordering = ordering
        self.processed: list[str] = []

    def __call__(self, e: ReceivedEvent, depth: int = 0) -> None:
        with self.ordering.preceding_event_confirmed(self, e, depth, now=NOW):
            self.processed.append(e.event)

    def deliver(self, *events: ReceivedEvent) -> None:
        for e in events:
            with contextlib.suppress(EventArrivedEarly):
                self(e)

    def batch(self, conn: apsw.Connection, *events: ReceivedEvent) -> None:
        """One transaction, one batch, as `Engine.process_batch` runs them."""
        with conn, self.ordering.batch():
            self.deliver(*events)


def seen_rows(store: Store) -> int:
    row = store.conn.execute("SELECT count(*) FROM ordering_seen").fetchone()
    assert row is not None
    return int(row[0])


# --- ordering batches ----------------------------------------------------------------------


def test_seen_marks_are_written_when_the_batch_ends_and_read_inside_it(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)
    with store.conn, ordering.batch():
        recorder.deliver(leader)
        assert seen_rows(store) == 0  # held in memory...
        assert ordering.event_has_been_seen(leader, now=NOW)  # ...and visible
        recorder.deliver(follower)  # later in the same batch: proceeds, not parked
    assert recorder.processed == ["leader", "follower"]
    assert seen_rows(store) == 2
    assert ordering.parked_count() == 0


def test_a_follower_parked_in_the_same_batch_is_released_by_its_leader(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)
    recorder.batch(store.conn, follower, leader)
    assert recorder.processed == ["leader", "follower"]
    assert ordering.parked_count() == 0


def test_a_follower_parked_by_an_earlier_batch_or_another_process_is_found(
    tmp_path: Path,
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    first = Store.open(tmp_path / "restart.db")
    try:
        Recorder(CausalOrdering("hot", first.conn)).batch(first.conn, follower)
    finally:
        first.close()
    second = Store.open(tmp_path / "restart.db")  # a restart: the set is read from disk
    try:
        recorder = Recorder(CausalOrdering("hot", second.conn))
        recorder.batch(second.conn, event("unrelated", 0))
        recorder.batch(second.conn, leader)
        assert recorder.processed == ["unrelated", "leader", "follower"]
    finally:
        second.close()


def test_a_rolled_back_release_is_released_again_by_the_retry(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)
    recorder.batch(store.conn, follower)

    def failing() -> None:
        with store.conn, ordering.batch():
            recorder.deliver(leader)
            raise KeyError("the batch failed after the release")

    with pytest.raises(KeyError):
        failing()
    assert ordering.parked_count() == 1
    assert not ordering.event_has_been_seen(leader, now=NOW)
    recorder.batch(store.conn, leader)
    assert recorder.processed == ["leader", "follower"] * 2
    assert ordering.parked_count() == 0


def test_a_commit_that_fails_after_the_batch_ended_does_not_lose_the_leader(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)
    recorder.batch(store.conn, follower)

    def failing_commit() -> None:
        with store.conn:
            with ordering.batch():
                recorder.deliver(leader)
            raise apsw.FullError("the commit failed")  # as a full disk would at COMMIT

    with pytest.raises(apsw.FullError):
        failing_commit()
    assert ordering.parked_count() == 1
    recorder.batch(store.conn, leader)
    assert recorder.processed[-2:] == ["leader", "follower"]
    assert ordering.parked_count() == 0


def test_a_rolled_back_park_only_costs_a_lookup(store: Store, ordering: CausalOrdering) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)

    def failing() -> None:
        with store.conn, ordering.batch():
            recorder.deliver(follower)
            raise KeyError("rolled back")

    with pytest.raises(KeyError):
        failing()
    recorder.batch(store.conn, leader)
    assert recorder.processed == ["leader"]
    assert ordering.parked_count() == 0


def test_lost_followers_and_clear_keep_the_set_truthful(
    store: Store, ordering: CausalOrdering
) -> None:
    leader = event("leader", 1)
    follower = event("follower", 2, follows=leader.id)
    recorder = Recorder(ordering)
    recorder.batch(store.conn, follower)
    with store.conn:
        lost = ordering.get_lost_followers(now=follower.received + timedelta(hours=1))
    assert [e.id for e in lost] == [follower.id]
    again = event("again", 3, follows=leader.id)
    recorder.batch(store.conn, again)
    ordering.clear()
    recorder.batch(store.conn, leader)
    assert recorder.processed == ["leader"]


def test_batches_do_not_nest(store: Store, ordering: CausalOrdering) -> None:
    inner = CausalOrdering("hot", store.conn).batch()
    with store.conn, ordering.batch(), pytest.raises(RuntimeError, match="batch"):
        inner.__enter__()


def test_batch_and_statement_paths_release_the_same_forests(tmp_path: Path) -> None:
    """Chains, siblings and orphans in mixed arrival order, in batches of every size,
    end in the same processed order with and without `batch()`."""
    root = event("root", 0)
    a = event("a", 1, follows=root.id)
    b = event("b", 2, follows=root.id)
    c = event("c", 3, follows=a.id)
    d = event("d", 4, follows=c.id)
    orphan = event("orphan", 5, follows=uuid4())
    arrivals = [d, b, c, orphan, root, a]
    results: list[list[str]] = []
    for size in (1, 2, 3, 6, 0):
        opened = Store.open(tmp_path / f"forest{size}.db")
        try:
            ordering = CausalOrdering("hot", opened.conn)
            recorder = Recorder(ordering)
            if size == 0:
                with opened.conn:
                    recorder.deliver(*arrivals)
            else:
                for start in range(0, len(arrivals), size):
                    recorder.batch(opened.conn, *arrivals[start : start + size])
            results.append(recorder.processed)
            assert ordering.parked_count() == 1  # the orphan
        finally:
            opened.close()
    assert all(r == results[-1] for r in results)
    assert results[-1] == ["root", "b", "a", "c", "d"]  # a arrives after root released b


# --- the engine tells the evaluator when others have work ---------------------------------


def counting(name: str, threshold: int) -> Automation:
    return Automation.model_validate(
        {
            "name": name,
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": [name],
                "threshold": threshold,
                "within": 60,
            },
            "actions": [{"type": "do-nothing"}],
        }
    )


def wire_event(name: str) -> ReceivedEvent:
    return parse_incoming_event(
        {
            "occurred": "2026-03-01T12:00:01Z",
            "event": name,
            "resource": {"prefect.resource.id": "r"},
        },
        NOW,
    )


def test_handed_off_says_whether_the_batch_wrote_work_for_others(store: Store) -> None:
    engine = Engine(inbox_drain_limit=1)
    conn = store.conn
    engine.load_automations(conn, [counting("two", 2)], NOW)

    def batch(*events: ReceivedEvent) -> bool:
        with conn:
            done = engine.process_batch(conn, list(events), NOW)
        return done.handed_off

    assert not batch(wire_event("two"))  # counted, nothing fired
    assert batch(wire_event("two"))  # fired: an outbox row and events in the inbox

    def inbox() -> int:
        row = conn.execute("SELECT count(*) FROM inbox").fetchone()
        assert row is not None
        return int(row[0])

    assert inbox() == 1  # two events made, one drained: the pump has work
    assert not batch()  # the pump's drain takes the last one and says so
    assert inbox() == 0


class Sink:
    def __init__(self) -> None:
        self.resolved_ids: list[UUID] = []

    def resolved(self, submission: Submission, error: str | None) -> None:
        submission.done = True
        self.resolved_ids.append(submission.event.id)


@pytest.mark.parametrize(
    ("names", "expected_wakes"), [(["one"], 1), (["none"], 0), (["none", "one"], 1)]
)
async def test_the_evaluator_wakes_the_others_only_for_work(
    store: Store, names: list[str], expected_wakes: int
) -> None:
    engine = Engine()
    engine.load_automations(store.conn, [counting("one", 1)], NOW)
    wakes: list[int] = []
    sink = Sink()
    send, receive = trio.open_memory_channel[Submission](10)
    with trio.fail_after(10):
        async with send:
            for name in names:
                send.send_nowait(Submission(wire_event(name), sink))
        await run_evaluator(
            StoreGateway(store),
            engine,
            receive,
            clock=lambda: NOW,
            batch_max=1,
            on_commit=lambda: wakes.append(1),
        )
    assert len(sink.resolved_ids) == len(names)
    assert len(wakes) == expected_wakes


# --- buckets -------------------------------------------------------------------------------


def test_counting_one_more_changes_only_count_event_and_operation(store: Store) -> None:
    e = wire_event("x")
    bucket = Bucket(("k",), S, S + timedelta(minutes=1), 1, None, "ensure_bucket[insert]")
    conn = store.conn
    with conn:
        buckets_store.write_bucket(conn, "t", "a", bucket, proactive=False)
        counted = Bucket(bucket.key, S, bucket.end, 2, EventRef.of(e), "increment_bucket")
        buckets_store.save_bucket(conn, "t", "a", bucket.key, bucket, counted, proactive=False)
    stored = buckets_store.read_bucket(conn, "t", ("k",))
    assert stored is not None
    got: dict[str, Any] = {
        "start": stored.start,
        "end": stored.end,
        "count": stored.count,
        "op": stored.last_operation,
    }
    assert got == {"start": S, "end": bucket.end, "count": 2, "op": "increment_bucket"}
    assert stored.last_event is not None
    assert stored.last_event.model() == e


def test_the_writer_connection_gets_its_page_cache(store: Store) -> None:
    row = store.conn.execute("PRAGMA cache_size").fetchone()
    assert row is not None
    assert row[0] == -WRITER_CACHE_KIB


def test_the_writer_connection_checkpoints_its_wal_less_often(store: Store) -> None:
    row = store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert row == (WAL_AUTOCHECKPOINT_PAGES,)


def test_a_failed_commit_makes_the_engine_reread_its_events_clock(store: Store) -> None:
    """A COMMIT can fail after the engine returned (a full disk, a deferred constraint): the
    events clock it advanced in memory must go back to what the database holds."""
    conn = store.conn
    engine = Engine()
    first = event("a", 1)
    process_in_transaction(conn, engine, [first], NOW)
    committed = engine.clock.copy()
    conn.execute(
        "CREATE TABLE parent (id TEXT PRIMARY KEY);"
        "CREATE TABLE child (parent_id TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
        "CREATE TEMP TRIGGER dangle AFTER INSERT ON events "
        "BEGIN INSERT INTO child VALUES ('nobody'); END"
    )
    later = event("b", 5)
    with pytest.raises(apsw.ConstraintError):  # at COMMIT: the foreign key is deferred
        process_in_transaction(conn, engine, [later], NOW + timedelta(seconds=5))
    assert engine.clock != committed  # what the engine did before the COMMIT failed
    conn.execute("DROP TRIGGER dangle")
    assert [row[0] for row in conn.execute("SELECT id FROM events")] == [str(first.id)]
    with conn:
        engine.process_batch(conn, [], NOW)  # the next batch starts from the stored clock
    assert engine.clock == committed


# --- bucket write-back ---------------------------------------------------------------------

COUNTER = Automation.model_validate(
    {
        "name": "counter",
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": ["tick"],
            "for_each": ["prefect.resource.id"],
            "threshold": 2,
            "within": 60,
        },
        "actions": [{"type": "do-nothing"}],
    }
)


def tick(resource: str, seconds: int) -> ReceivedEvent:
    """A `tick` of `resource`, `seconds` after S."""
    at = S + timedelta(seconds=seconds)
    return ReceivedEvent(
        event="tick",
        resource=Resource({"prefect.resource.id": resource}),
        occurred=at,
        received=at,
        id=uuid4(),
    )


def ticks(n: int, resources: int) -> list[ReceivedEvent]:
    """`n` ticks a second apart, over `resources` resources in turn."""
    return [tick(f"r{i % resources}", i) for i in range(n)]


def table(store: Store) -> list[tuple[Any, ...]]:
    return store.conn.execute(
        "SELECT trigger_id, bucketing_key, automation_id, start_us, end_us, count, "
        "last_event, last_operation FROM buckets ORDER BY trigger_id, bucketing_key"
    ).fetchall()


def outbox_rows(store: Store) -> int:
    row = store.conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert row is not None
    return int(row[0])


def test_a_failed_batch_leaves_no_bucket_change_behind_for_the_retry(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's bucket changes wait in memory until it ends; when it fails they must
    go with its transaction, or the retry would count the same events twice."""
    engine = Engine()
    with store.conn:
        engine.load_automations(store.conn, [COUNTER], S)
    batch = ticks(2, 1)  # the second one fires

    def broken(*args: object) -> None:
        raise RuntimeError("the action could not be written")

    monkeypatch.setattr("daemon.engine.engine.acting.act", broken)
    with pytest.raises(RuntimeError):
        process_in_transaction(store.conn, engine, batch, NOW)
    assert table(store) == []
    monkeypatch.undo()
    process_in_transaction(store.conn, engine, batch, NOW)
    assert outbox_rows(store) == 1  # fired once, from a count of 2, not from a stale count
    assert [row[5] for row in table(store)] == [0]  # the next window, empty


@pytest.mark.parametrize("limit", [1, 3])
def test_bucket_write_back_leaves_what_writing_at_once_leaves(tmp_path: Path, limit: int) -> None:
    """Written back early (a tiny limit) or at the end, the table ends up the same, and
    the same as the engine writing each change as it happens (a unit of one event)."""
    events = ticks(40, 7)
    results = []
    for name, engine, batches in [
        ("at-once", Engine(), [[e] for e in events]),
        ("limited", Engine(pending_bucket_limit=limit), [events[:25], events[25:]]),
        ("batched", Engine(), [events[:25], events[25:]]),
    ]:
        opened = Store.open(tmp_path / f"{name}.db")
        try:
            with opened.conn:
                engine.load_automations(opened.conn, [COUNTER], S)
            for batch in batches:
                process_in_transaction(opened.conn, engine, batch, NOW)
            results.append((table(opened), outbox_rows(opened)))
        finally:
            opened.close()
    assert results[0] == results[1] == results[2]
    assert results[0][1] > 0


# --- the start-ordered index holds Proactive triggers' buckets only --------------------------

WATCHDOG = Automation.model_validate(
    {
        "name": "watchdog",
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "expect": ["tick"],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 60,
        },
        "actions": [{"type": "do-nothing"}],
    }
)


def test_only_proactive_buckets_are_in_the_due_index_and_the_pass_reads_it(
    store: Store,
) -> None:
    conn = store.conn
    engine = Engine()
    with conn:
        engine.load_automations(conn, [COUNTER, WATCHDOG], NOW)
    process_in_transaction(conn, engine, ticks(6, 3), NOW)
    by_trigger = {
        (str(trigger_id), int(proactive))
        for trigger_id, proactive in conn.execute("SELECT trigger_id, proactive FROM buckets")
    }
    assert by_trigger == {(str(COUNTER.trigger.id), 0), (str(WATCHDOG.trigger.id), 1)}
    indexed = conn.execute(
        "SELECT count(*) FROM buckets INDEXED BY buckets_due WHERE proactive"
    ).fetchone()
    assert indexed == (3,)  # one per resource, the watchdog's only
    for proactive in (True, False):
        pages = list(
            buckets_store.iter_buckets(conn, str(WATCHDOG.trigger.id), proactive=proactive)
        )
        assert [b.key for b in pages] == [("r0",), ("r1",), ("r2",)], proactive


def query_plan(conn: Connection, sql: str, params: tuple[object, ...]) -> str:
    return " | ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_the_pass_looks_up_due_and_counted_buckets_without_a_scan(store: Store) -> None:
    """What a proactive pass asks the table costs what is due, not what is open."""
    conn = store.conn
    traced: list[str] = []

    def trace(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
        traced.append(sql)
        return True

    conn.exec_trace = trace
    engine = Engine()
    with conn:
        engine.load_automations(conn, [WATCHDOG], NOW)
        engine.proactive(conn, NOW)
    conn.exec_trace = None
    statements = [sql for sql in traced if "buckets" in sql and "proactive" in sql]
    assert statements
    for sql in statements:
        params = (str(WATCHDOG.trigger.id),) + (0,) * (sql.count("?") - 1)
        plan = query_plan(conn, sql, params)
        assert "buckets_due" in plan or "buckets_met" in plan, (sql, plan)
        assert "SCAN buckets" not in plan, (sql, plan)
        assert "TEMP B-TREE" not in plan, (sql, plan)


# --- the inbox is only looked into when something can be in it -----------------------------


def statements(conn: Connection, work: Any) -> list[str]:
    """The SQL statements `work()` ran on `conn`."""
    traced: list[str] = []

    def trace(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
        traced.append(sql)
        return True

    conn.exec_trace = trace
    try:
        work()
    finally:
        conn.exec_trace = None
    return traced


def inbox_statements(conn: Connection, engine: Engine, events: list[ReceivedEvent]) -> int:
    """Run one batch the evaluator's way; how many of its statements read the inbox."""
    ran = statements(conn, lambda: process_in_transaction(conn, engine, events, NOW))
    return sum("FROM inbox" in sql for sql in ran)


def inbox_rows(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM inbox").fetchone()
    assert row is not None
    return int(row[0])


def test_an_inbox_found_empty_is_not_read_again_until_something_is_queued(store: Store) -> None:
    conn = store.conn
    engine = Engine()
    assert inbox_statements(conn, engine, [event("a", 1)]) == 1  # never looked: look
    assert inbox_statements(conn, engine, [event("b", 2)]) == 0  # found empty, nothing queued
    made = wire_event("made.by.the.sender")
    with conn:  # as the sender queues an action event, in its own transaction
        events_store.push_inbox(conn, [made])
    assert inbox_statements(conn, engine, []) > 0
    assert inbox_rows(conn) == 0
    assert conn.execute("SELECT count(*) FROM events WHERE id = ?", (str(made.id),)).fetchone() == (
        1,
    )
    assert inbox_statements(conn, engine, []) == 0


def test_an_inbox_drained_by_a_rolled_back_batch_is_drained_again(store: Store) -> None:
    conn = store.conn
    engine = Engine()
    made = wire_event("made.by.the.sender")
    with conn:
        events_store.push_inbox(conn, [made])
    conn.execute(
        "CREATE TABLE parent (id TEXT PRIMARY KEY);"
        "CREATE TABLE child (parent_id TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
        "CREATE TEMP TRIGGER dangle AFTER INSERT ON events "
        "BEGIN INSERT INTO child VALUES ('nobody'); END"
    )
    with pytest.raises(apsw.ConstraintError):  # drained, found empty, then COMMIT failed
        process_in_transaction(conn, engine, [], NOW)
    conn.execute("DROP TRIGGER dangle")
    assert inbox_rows(conn) == 1
    assert inbox_statements(conn, engine, []) > 0
    assert inbox_rows(conn) == 0


def stored_data(conn: apsw.Connection, event_id: UUID) -> str:
    row = conn.execute("SELECT data FROM events WHERE id = ?", (str(event_id),)).fetchone()
    assert row is not None
    return str(row[0])


def test_a_batch_drains_its_own_firings_events_without_parsing_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = store.conn
    engine = Engine()
    engine.load_automations(conn, [counting("one", 1)], NOW)
    parsed: list[str] = []
    real = ReceivedEvent.model_validate_json

    def counting_parse(data: str | bytes, **kwargs: Any) -> ReceivedEvent:
        parsed.append(str(data))
        return real(data, **kwargs)

    monkeypatch.setattr(ReceivedEvent, "model_validate_json", counting_parse)
    with conn:
        done = engine.process_batch(conn, [wire_event("one")], NOW)
    made = list(done.own_events)
    assert [e.event for e in made] == [
        "prefect.automation.triggered",
        "prefect.automation.action.triggered",
    ]
    assert parsed == []  # taken as the firing made them, not read back from the inbox
    assert inbox_rows(conn) == 0
    for e in made:  # stored as parsing and writing them again would have stored them
        data = stored_data(conn, e.id)
        assert data == e.model_dump_json() == real(data).model_dump_json()
    assert conn.state.inbox_made == {}


def test_an_event_queued_in_a_rolled_back_transaction_is_never_taken_for_another(
    store: Store,
) -> None:
    conn = store.conn
    engine = Engine()
    undone, queued = wire_event("undone"), wire_event("queued")
    conn.execute("BEGIN")
    events_store.push_inbox(conn, [undone])
    conn.execute("ROLLBACK")  # its row is gone, and its seq is taken again below
    with conn:
        events_store.push_inbox(conn, [queued])
    with conn:
        done = engine.process_batch(conn, [], NOW)
    assert [e.id for e in done.own_events] == [queued.id]


def test_events_queued_and_never_drained_here_are_forgotten_past_the_bound(
    store: Store,
) -> None:
    conn = store.conn
    with conn:
        events_store.push_inbox(
            conn, [wire_event(f"e{i}") for i in range(events_store.INBOX_MADE_LIMIT + 1)]
        )
        events_store.push_inbox(conn, [last := wire_event("last")])
    assert list(conn.state.inbox_made.values()) == [last]
    with conn:  # the pump drains them all the same, parsing those it no longer keeps
        done = Engine(inbox_drain_limit=2 * events_store.INBOX_MADE_LIMIT).process_batch(
            conn, [], NOW
        )
    assert len(done.own_events) == events_store.INBOX_MADE_LIMIT + 2
    assert inbox_rows(conn) == 0


# --- buckets kept between batches (the backtest's scratch store) ----------------------------


def spread_ticks(n: int, resources: int, step: float) -> list[ReceivedEvent]:
    return [
        ReceivedEvent(
            event="tick",
            resource=Resource({"prefect.resource.id": f"r{i % resources}"}),
            occurred=S + timedelta(seconds=i * step),
            received=S + timedelta(seconds=i * step),
            id=uuid4(),
        )
        for i in range(n)
    ]


def in_batches(conn: Connection, engine: Engine, events: list[ReceivedEvent]) -> Iterator[int]:
    """Batches of 20, each followed by a proactive pass and the periodic one (the sweep), as
    a backtest runs them; what each sweep returned, after it."""
    for start in range(0, len(events), 20):
        part = events[start : start + 20]
        now = part[-1].occurred
        process_in_transaction(conn, engine, part, now)
        with conn:
            engine.proactive(conn, now)
        with conn:
            yield engine.periodic(conn, now).swept


def run_kept(path: Path, kept: int, events: list[ReceivedEvent]) -> list[Any]:
    """Batches of 20 with a proactive pass and the periodic one (the sweep) after each,
    as a backtest runs them; the bucket table after each batch, and the firings."""
    opened = Store.open(path)
    conn = opened.conn
    try:
        engine = Engine()
        engine.keep_buckets(conn, kept)
        with conn:
            engine.load_automations(conn, [COUNTER, WATCHDOG], S)
        seen = [table(opened) for _ in in_batches(conn, engine, events)]
        seen.append(conn.execute("SELECT event, count(*) FROM events GROUP BY event").fetchall())
    finally:
        opened.close()
    return seen


@pytest.mark.parametrize("kept", [1, 3, 1_000])
def test_buckets_kept_between_batches_leave_what_reading_the_table_leaves(
    tmp_path: Path, kept: int
) -> None:
    """`Engine.keep_buckets`: the same batches, proactive passes and sweeps (which delete
    closed windows) leave the same buckets and firings, whether each batch reads its
    buckets from the table (0, the daemon's engine) or from what earlier ones kept (a
    tiny bound forgets them all now and then)."""
    events = spread_ticks(300, 7, 2.5)
    reference = run_kept(tmp_path / "table.db", 0, events)
    assert dict(reference[-1])["prefect.automation.triggered"] > 0
    tables = reference[:-1]
    assert any(len(a) > len(b) for a, b in itertools.pairwise(tables))  # the sweep deleted some
    assert run_kept(tmp_path / "kept.db", kept, events) == reference


def bucket_reads(conn: Connection, work: Any) -> int:
    """How many statements `work()` ran that read the buckets table."""
    return sum(
        1 for sql in statements(conn, work) if sql.startswith("SELECT") and "FROM buckets" in sql
    )


def test_kept_buckets_are_read_from_the_table_only_while_unknown(store: Store) -> None:
    """A store whose triggers have rows already: what a batch read or wrote is not read
    again; a store where they have none: no bucket is read at all."""
    conn = store.conn
    engine = Engine()
    with conn:
        engine.load_automations(conn, [COUNTER], S)
    events = ticks(9, 3)
    process_in_transaction(conn, engine, events[:3], NOW)  # r0, r1, r2 have rows
    engine.keep_buckets(conn, 100)
    assert bucket_reads(conn, lambda: process_in_transaction(conn, engine, events[3:6], NOW))
    assert not bucket_reads(conn, lambda: process_in_transaction(conn, engine, events[6:], NOW))
    with conn:
        conn.execute("DELETE FROM buckets")
    engine.keep_buckets(conn, 100)
    assert not bucket_reads(conn, lambda: process_in_transaction(conn, engine, ticks(6, 3), NOW))
    engine.keep_buckets(conn, 0)
    assert bucket_reads(conn, lambda: process_in_transaction(conn, engine, ticks(3, 3), NOW))


def test_a_kept_bucket_the_sweep_deleted_is_forgotten(store: Store) -> None:
    """A late event for a key whose window the sweep removed starts a new window, as
    when nothing is kept: it must not count into the old window remembered."""
    conn = store.conn
    engine = Engine()
    engine.keep_buckets(conn, 100)
    with conn:
        engine.load_automations(conn, [COUNTER], S)

    process_in_transaction(conn, engine, [tick("r0", 0)], S)  # r0's window [0 s, 60 s)
    later = S + timedelta(seconds=200)
    process_in_transaction(conn, engine, [tick("r1", 200)], later)
    with conn:
        assert engine.periodic(conn, later).swept == 1  # r0's window closed 140 s ago: swept
    process_in_transaction(conn, engine, [tick("r0", 30)], later)  # late, for r0
    assert outbox_rows(store) == 0
    assert [(row[1], row[5]) for row in table(store)] == [('["r0"]', 1), ('["r1"]', 1)]


# --- kept buckets written back only when the table is read (the backtest's replay) ----------


def run_deferred(path: Path, kept: int, events: list[ReceivedEvent]) -> list[Any]:
    """`run_kept` with the bucket changes held back (`deferred=True`): what each sweep
    returned, then the table once written back, and the events the firings made."""
    opened = Store.open(path)
    conn = opened.conn
    try:
        engine = Engine()
        engine.keep_buckets(conn, kept, deferred=True)
        with conn:
            engine.load_automations(conn, [COUNTER, WATCHDOG], S)
        swept = list(in_batches(conn, engine, events))
        with conn:
            engine.keep_buckets(conn, 0)  # writes back what was held
        return [
            swept,
            table(opened),
            conn.execute("SELECT event, count(*) FROM events GROUP BY event").fetchall(),
        ]
    finally:
        opened.close()


@pytest.mark.parametrize("kept", [1, 3, 1_000])
def test_deferred_bucket_writes_leave_what_writing_through_leaves(
    tmp_path: Path, kept: int
) -> None:
    """The same batches, proactive passes and sweeps, with the kept buckets written back
    only when a sweep would judge them and at the end: each sweep deletes as many rows,
    the same firings are made, and the table ends up the same."""
    events = spread_ticks(300, 7, 2.5)
    events = events[:150] + [e for e in events[150:] if e.resource.id < "r3"]  # r3-r6 stop
    reference = run_deferred(tmp_path / "table.db", 0, events)
    assert sum(reference[0]) > 0  # the sweep deleted some
    assert dict(reference[2])["prefect.automation.triggered"] > 0
    assert run_deferred(tmp_path / f"deferred-{kept}.db", kept, events) == reference


def bucket_writes(conn: Connection, work: Any) -> int:
    return sum(
        1
        for sql in statements(conn, work)
        if sql.startswith(("INSERT INTO buckets", "UPDATE buckets", "DELETE FROM buckets"))
    )


def test_a_deferred_bucket_counting_many_events_is_written_once(store: Store) -> None:
    conn = store.conn
    engine = Engine()
    engine.keep_buckets(conn, 100, deferred=True)
    with conn:
        engine.load_automations(conn, [COUNTER], S)
    writes = 0
    for seconds in (0, 1, 60, 61, 120, 121):  # three windows of one key, each fired
        at = S + timedelta(seconds=seconds)
        tick = ReceivedEvent(event="tick", resource=RESOURCE, occurred=at, received=at, id=uuid4())
        writes += bucket_writes(conn, lambda: process_in_transaction(conn, engine, [tick], at))  # noqa: B023
    assert writes == 0
    assert table(store) == []
    assert outbox_rows(store) == 3
    with conn:
        assert bucket_writes(conn, lambda: engine.keep_buckets(conn, 0)) == 1
    assert [row[5] for row in table(store)] == [0]  # the window after the third firing


def test_the_sweep_writes_back_the_deferred_buckets_it_judges(store: Store) -> None:
    """r0's window closed long before the sweep's cutoff (it is deleted, and forgotten);
    r1's new window is open (written first, so the sweep leaves it); r2's is open and
    its row is not judged: it stays in memory."""
    conn = store.conn
    engine = Engine()
    engine.keep_buckets(conn, 100, deferred=True)
    with conn:
        engine.load_automations(conn, [COUNTER], S)

    process_in_transaction(conn, engine, [tick("r0", 0), tick("r1", 0)], S)
    with conn:
        engine.keep_buckets(conn, 100, deferred=True)  # r0, r1 in the table: [0 s, 60 s)
    later = S + timedelta(seconds=300)
    process_in_transaction(conn, engine, [tick("r1", 300), tick("r2", 300)], later)
    with conn:
        assert engine.periodic(conn, later).swept == 1  # r0 only: r1's row now ends at 360 s
    assert [row[1] for row in table(store)] == ['["r1"]']
    process_in_transaction(conn, engine, [tick("r0", 310)], later)  # a new window for r0
    with conn:
        engine.keep_buckets(conn, 0)
    assert [(row[1], row[5]) for row in table(store)] == [
        ('["r0"]', 1),
        ('["r1"]', 1),
        ('["r2"]', 1),
    ]


def test_a_failed_unit_while_deferring_stops_the_engine_until_it_stops_keeping(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What earlier batches held back is gone with the failed one: going on would read a
    table that is behind, so the engine refuses until `keep_buckets(conn, 0)`; dropping
    the kept buckets writes nothing."""
    conn = store.conn
    engine = Engine()
    engine.keep_buckets(conn, 100, deferred=True)
    with conn:
        engine.load_automations(conn, [COUNTER], S)
    process_in_transaction(conn, engine, ticks(1, 1), NOW)

    def broken(*args: object) -> None:
        raise RuntimeError("the action could not be written")

    monkeypatch.setattr("daemon.engine.engine.acting.act", broken)
    with pytest.raises(RuntimeError, match="could not be written"):
        process_in_transaction(conn, engine, ticks(2, 1)[1:], NOW)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="lost"):
        process_in_transaction(conn, engine, ticks(3, 2)[2:], NOW)
    with pytest.raises(RuntimeError, match="lost"):
        engine.keep_buckets(conn, 100, deferred=True)
    engine.keep_buckets(conn, 0)
    process_in_transaction(conn, engine, ticks(3, 2)[2:], NOW)
    engine.keep_buckets(conn, 100, deferred=True)
    process_in_transaction(conn, engine, ticks(4, 2)[3:], NOW)
    engine.drop_kept_buckets()
    assert [(row[1], row[5]) for row in table(store)] == [('["r0"]', 1)]
