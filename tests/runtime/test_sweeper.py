"""The sweeper task: runs at once on start, then every granularity, and survives its own
failures (scenarios 89 and 90); housekeeping prunes what retention says. Virtual time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import apsw
import attrs
import pytest
import trio
import trio.testing

from daemon.core.automations import Automation
from daemon.core.clock import to_us
from daemon.core.events import ReceivedEvent
from daemon.core.upstream import UpstreamStats
from daemon.engine.engine import ORDERING_SCOPE, Engine
from daemon.engine.ordering import CausalOrdering
from daemon.runtime.gateway import StoreGateway
from daemon.runtime.sweeper import SweepSettings, run_sweeper, sweep
from store import upstream as upstream_store
from store.db import Store
from tests.support.firing_lines import FiringLines, watching

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SETTINGS = SweepSettings(
    granularity=timedelta(seconds=5),
    event_retention=timedelta(days=7),
    outbox_retention=timedelta(days=7),
)


def add_closed_bucket(conn: apsw.Connection, ended: datetime) -> None:
    conn.execute(
        "INSERT INTO buckets (trigger_id, bucketing_key, automation_id, proactive, start_us,"
        " end_us, count) VALUES ('t', '[]', 'a', 0, ?, ?, 0)",
        (to_us(ended - timedelta(seconds=10)), to_us(ended)),
    )


def bucket_count(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM buckets").fetchone()
    assert row is not None
    return int(row[0])


class PassLog(logging.Handler):
    """Counts the sweeper's passes (successful ones via on_commit, failed ones via the
    log) and lets the test wait for the next one; time itself is frozen (MockClock)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.passes: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "periodic pass failed" in record.getMessage():
            self.note("failed")

    def note(self, what: str) -> None:
        self.passes.append(what)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.passes) < count:
            await self._changed.wait()


@pytest.fixture
def pass_log() -> Iterator[PassLog]:
    handler = PassLog()
    logger = logging.getLogger("daemon.runtime.sweeper")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_i90_the_first_pass_runs_at_start(
    store: Store, mock_clock: trio.testing.MockClock, pass_log: PassLog
) -> None:
    add_closed_bucket(store.conn, NOW - timedelta(hours=1))
    with trio.fail_after(30):  # real seconds: the mock clock does not move by itself
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_sweeper(
                    StoreGateway(store),
                    Engine(),
                    SETTINGS,
                    clock=lambda: NOW,
                    on_commit=lambda: pass_log.note("ok"),
                )
            )
            await pass_log.wait_for(1)
            assert trio.current_time() == 0  # no period had to elapse
            assert bucket_count(store.conn) == 0
            mock_clock.jump(4.9)
            await trio.testing.wait_all_tasks_blocked()
            assert pass_log.passes == ["ok"]
            mock_clock.jump(0.1)
            await pass_log.wait_for(2)
            assert pass_log.passes == ["ok", "ok"]
            nursery.cancel_scope.cancel()


async def test_i89_a_failing_pass_is_logged_and_the_loop_goes_on(
    store: Store, mock_clock: trio.testing.MockClock, pass_log: PassLog
) -> None:
    add_closed_bucket(store.conn, NOW - timedelta(hours=1))
    store.conn.execute(
        "CREATE TEMP TRIGGER refuse BEFORE DELETE ON buckets "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    gateway = StoreGateway(store)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_sweeper(
                    gateway,
                    Engine(),
                    SETTINGS,
                    clock=lambda: NOW,
                    on_commit=lambda: pass_log.note("ok"),
                )
            )
            for passes in (1, 2, 3):
                await pass_log.wait_for(passes)
                if passes < 3:
                    mock_clock.jump(5)
            assert pass_log.passes == ["failed"] * 3
            assert bucket_count(store.conn) == 1  # every failed pass rolled back
            await gateway.run(lambda conn: conn.execute("DROP TRIGGER refuse"))
            mock_clock.jump(5)
            await pass_log.wait_for(4)
            assert pass_log.passes[3] == "ok"
            assert bucket_count(store.conn) == 0
            nursery.cancel_scope.cancel()


def test_housekeeping_prunes_by_retention(store: Store) -> None:
    conn = store.conn
    old, recent = NOW - timedelta(days=8), NOW - timedelta(days=1)
    for event_id, received in (("old", old), ("recent", recent)):
        conn.execute(
            "INSERT INTO events (id, event, resource_id, occurred_us, received_us, data)"
            " VALUES (?, 'e', 'r', ?, ?, '{}')",
            (event_id, to_us(received), to_us(received)),
        )
    for row_id, finished, status in (
        ("done-old", old, "delivered"),
        ("dead-old", old, "dead"),
        ("done-new", recent, "delivered"),
        ("waiting", None, "pending"),
    ):
        conn.execute(
            "INSERT INTO outbox (id, automation_id, action_index, action_type, status, document,"
            " created_us, next_attempt_us, finished_us)"
            " VALUES (?, 'a', 0, 'do-nothing', ?, '{}', ?, ?, ?)",
            (row_id, status, to_us(old), to_us(old), None if finished is None else to_us(finished)),
        )
    report = sweep(conn, Engine(), SETTINGS, NOW)
    assert report.pruned_events == 1
    assert report.pruned_outbox == 2
    assert [r[0] for r in conn.execute("SELECT id FROM events")] == ["recent"]
    assert sorted(r[0] for r in conn.execute("SELECT id FROM outbox")) == ["done-new", "waiting"]


def test_a_rolled_back_pass_does_not_postpone_proactive_alarms(store: Store, db_path: Path) -> None:
    """Nor does it log the firing it rolled back; the next pass logs its own once, after
    its commit."""
    conn = store.conn
    lonely = Automation.model_validate(
        {
            "name": "no walks",
            "trigger": {
                "type": "event",
                "expect": ["animal.walked"],
                "posture": "Proactive",
                "threshold": 1,
                "within": 30,
            },
            "actions": [{"type": "do-nothing"}],
        }
    )
    engine = Engine()
    engine.load_automations(conn, [lonely], NOW)
    sweep(conn, engine, SETTINGS, NOW)  # opens the window [NOW, NOW + 30 s)
    # the periodic half of the next pass fails after the proactive half fired
    lost = ReceivedEvent.model_validate(
        {
            "occurred": NOW - timedelta(hours=1),
            "received": NOW - timedelta(hours=1),
            "event": "animal.walked",
            "resource": {"prefect.resource.id": "spider"},
            "id": uuid4(),
            "follows": uuid4(),
        }
    )
    with conn:
        CausalOrdering(ORDERING_SCOPE, conn).record_follower(lost)
    conn.execute(
        "CREATE TEMP TRIGGER refuse BEFORE DELETE ON ordering_followers "
        "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    with watching(FiringLines(db_path, conn)) as witness:
        with pytest.raises(apsw.ConstraintError):
            sweep(conn, engine, SETTINGS, NOW + timedelta(seconds=30))
        assert outbox_rows(conn) == 0  # the firing rolled back with the pass
        assert witness.lines == []  # and nothing says it fired
        conn.execute("DROP TRIGGER refuse")
        sweep(conn, engine, SETTINGS, NOW + timedelta(seconds=31))
    assert outbox_rows(conn) == 1  # fired at the next pass, not a whole window later
    [line] = witness.lines
    assert line.message.startswith("automation 'no walks' fired: event trigger ")
    assert (line.in_transaction, line.committed_rows) == (False, 1)


def outbox_rows(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert row is not None
    return int(row[0])


def add_unforwarded(store: Store) -> None:
    """A forwarded event 9 days old, then two never forwarded: 10 and 8 days old."""
    conn = store.conn
    for event_id, days in (("sent", 9), ("unsent-10d", 10), ("unsent-8d", 8)):
        received = NOW - timedelta(days=days)
        conn.execute(
            "INSERT INTO events (id, event, resource_id, occurred_us, received_us, data)"
            " VALUES (?, 'e', 'r', ?, ?, '{}')",
            (event_id, to_us(received), to_us(received)),
        )
        if event_id == "sent":
            upstream_store.set_forward_cursor(conn, conn.last_insert_rowid())


async def test_unforwarded_events_dropped_past_the_backlog_are_logged_and_counted(
    store: Store, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    add_unforwarded(store)
    stats = UpstreamStats()
    settings = attrs.evolve(SETTINGS, forward_backlog=timedelta(days=9))
    first_pass = trio.Event()
    with trio.fail_after(30):  # real seconds: the mock clock does not move by itself
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_sweeper(
                    StoreGateway(store),
                    Engine(),
                    settings,
                    clock=lambda: NOW,
                    on_commit=first_pass.set,
                    upstream=stats,
                )
            )
            await first_pass.wait()
            nursery.cancel_scope.cancel()
    assert stats.dropped == 1
    assert (
        "upstream backlog: dropped 1 events never forwarded, received more than "
        "[upstream] backlog (9d) ago" in caplog.text
    )


def test_retention_spares_events_not_forwarded_upstream_up_to_the_backlog(store: Store) -> None:
    """With [upstream] forwarding on, an event past the forward cursor outlives
    event_retention until it is older than the backlog bound; then it is dropped and
    counted, and run_sweeper logs it (docs/OPERATIONS.md)."""
    add_unforwarded(store)
    conn = store.conn
    settings = attrs.evolve(SETTINGS, forward_backlog=timedelta(days=9))
    report = sweep(conn, Engine(), settings, NOW)
    assert (report.pruned_events, report.dropped_unforwarded) == (2, 1)
    assert [r[0] for r in conn.execute("SELECT id FROM events")] == ["unsent-8d"]


WATCHDOG = Automation.model_validate(
    {
        "name": "device watchdog",
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["device.heartbeat"],
            "expect": ["device.heartbeat"],
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": 60,
        },
        "actions": [{"type": "do-nothing"}],
    }
)


def dead_devices(conn: apsw.Connection, count: int) -> None:
    """`count` buckets of WATCHDOG whose window ended before NOW."""
    with conn:
        for i in range(count):
            end = NOW - timedelta(seconds=1 + i)
            conn.execute(
                "INSERT INTO buckets (trigger_id, bucketing_key, automation_id, proactive,"
                " start_us, end_us, count) VALUES (?, ?, ?, 1, ?, ?, 0)",
                (
                    str(WATCHDOG.trigger.id),
                    f'["device.{i}"]',
                    str(WATCHDOG.id),
                    to_us(end - timedelta(seconds=60)),
                    to_us(end),
                ),
            )


def closed_per_commit(conn: apsw.Connection) -> list[int]:
    """Starts recording how many buckets were deleted by the time of each commit (a
    watchdog's bucket is deleted when it fires; the outbox has no rowid to hook)."""
    inserted = 0
    seen: list[int] = []

    def update(kind: int, _db: str, table: str, _rowid: int) -> None:
        nonlocal inserted
        if table == "buckets" and kind == apsw.SQLITE_DELETE:
            inserted += 1

    def commit() -> bool:
        seen.append(inserted)
        return False  # go on with the commit

    conn.set_update_hook(update)
    conn.set_commit_hook(commit)
    return seen


def assert_steps(committed: list[int], total: int, chunk: int) -> None:
    """The firings went out over several commits, at most `chunk` per commit."""
    per_commit = [b - a for a, b in zip([0, *committed[:-1]], committed, strict=True)]
    assert committed[-1] == total
    assert max(per_commit) <= chunk, per_commit
    assert sum(1 for n in per_commit if n) >= -(-total // chunk), per_commit


async def sweep_once(store: Store, engine: Engine, settings: SweepSettings) -> None:
    """`run_sweeper` until its first pass has committed (`on_commit`), then stopped."""
    passed = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_sweeper(
                StoreGateway(store), engine, settings, clock=lambda: NOW, on_commit=passed.set
            )
        )
        await passed.wait()
        nursery.cancel_scope.cancel()


async def test_a_pass_over_many_due_buckets_commits_in_steps(store: Store) -> None:
    """35 dead devices, 10 buckets per step: the firings are committed 10 at a time, in
    separate gateway calls (acks wait for one step), and all of them go out."""
    conn = store.conn
    engine = Engine()
    engine.load_automations(conn, [WATCHDOG], NOW)
    dead_devices(conn, 35)
    committed = closed_per_commit(conn)
    settings = attrs.evolve(SETTINGS, proactive_chunk=10)
    with trio.fail_after(30):
        await sweep_once(store, engine, settings)
    conn.set_commit_hook(None)
    conn.set_update_hook(None)
    assert_steps(committed, 35, 10)
    assert outbox_rows(conn) == 35


async def test_proactive_firings_are_logged_after_their_step_commits(
    store: Store, db_path: Path
) -> None:
    """Each step's firings are logged on the trio thread once that step has committed,
    not in the store thread inside its transaction."""
    conn = store.conn
    engine = Engine()
    engine.load_automations(conn, [WATCHDOG], NOW)
    dead_devices(conn, 25)
    settings = attrs.evolve(SETTINGS, proactive_chunk=10)
    with watching(FiringLines(db_path, conn)) as witness, trio.fail_after(30):
        await sweep_once(store, engine, settings)
    assert len({line.firing for line in witness.lines}) == len(witness.lines) == 25
    assert {
        (line.main_thread, line.in_transaction, line.committed_rows) for line in witness.lines
    } == {(True, False, 1)}


def test_a_whole_sweep_also_commits_in_steps(store: Store) -> None:
    conn = store.conn
    engine = Engine()
    engine.load_automations(conn, [WATCHDOG], NOW)
    dead_devices(conn, 25)
    committed = closed_per_commit(conn)
    sweep(conn, engine, attrs.evolve(SETTINGS, proactive_chunk=10), NOW)
    conn.set_commit_hook(None)
    conn.set_update_hook(None)
    assert_steps(committed, 25, 10)
