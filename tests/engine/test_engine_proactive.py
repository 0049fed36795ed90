"""Proactive evaluation, regressions and flow-run SLAs: scenarios e34, f35-f59 and g47-g51."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import apsw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.automations import Automation
from daemon.core.buckets import Bucket
from daemon.engine.engine import Outcome
from store.buckets import write_bucket
from tests.support.engine_harness import (
    CHONK_SADNESS,
    EFFECTIVE,
    Harness,
    HarnessMaker,
    T,
    automation,
    event,
    fired,
    only_trigger,
    trigger,
)

M = timedelta(minutes=1)
S = timedelta(seconds=1)
FLOW_RUN_ID = {"prefect.resource.id": "prefect.flow-run.*"}


# --- e34 ---------------------------------------------------------------------------------


def test_e34_rolling_proactive_windows(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    counts = []
    for seconds in (0, 9, 10, 30, 31, 60):
        for a in EFFECTIVE:
            h.P(a, T + seconds * S)
        counts.append([(x.automation.id, x.triggering_event) for x in fired(h)])
    assert counts == [[], [], [], [(CHONK_SADNESS.id, None)], [], [(CHONK_SADNESS.id, None)]]


# --- f35-f46 regressions -----------------------------------------------------------------

WQ = "prefect.work-queue.7f3c"
UNHEALTHY = automation(
    "unhealthy work queues",
    trigger(
        match={"prefect.resource.id": WQ},
        for_each=["prefect.resource.id"],
        after=["prefect.work-queue.unhealthy"],
        expect=["prefect.work-queue.healthy"],
        posture="Proactive",
        threshold=1,
        within=119 * 60,
    ),
)


def test_f35_unhealthy_work_queue(harness: HarnessMaker) -> None:
    h = harness([UNHEALTHY])
    unhealthy = event("prefect.work-queue.unhealthy", T, WQ)
    h.R(unhealthy)
    h.P(UNHEALTHY, T + 21 * M)
    assert fired(h) == []
    h.P(UNHEALTHY, T + 120 * M)
    [action] = fired(h)
    assert action.triggering_labels == {"prefect.resource.id": WQ}
    assert action.triggering_event == unhealthy
    assert action.triggered == T + 120 * M  # P(t) runs at wall time t


def test_f36_queue_recovered(harness: HarnessMaker) -> None:
    h = harness([UNHEALTHY])
    h.R(event("prefect.work-queue.unhealthy", T, WQ))
    h.R(event("prefect.work-queue.healthy", T + 20 * M, WQ))
    h.P(UNHEALTHY, T + 21 * M)
    h.P(UNHEALTHY, T + 120 * M)
    assert fired(h) == []


def _same(posture: str, threshold: int, within: float) -> Any:
    return automation(
        "both expect and after",
        trigger(
            after=["some-event"],
            expect=["some-event"],
            posture=posture,
            threshold=threshold,
            within=within,
        ),
    )


def some_event(at: timedelta) -> Any:
    return event("some-event", T + at, "some.resource")


def test_f37_after_equals_expect_within_zero_never_fires(harness: HarnessMaker) -> None:
    h = harness([_same("Reactive", 1, 0)])
    for seconds in range(4):
        h.R(some_event(seconds * S))
    assert fired(h) == []


def test_f38_after_equals_expect_fires_after_threshold(harness: HarnessMaker) -> None:
    h = harness([_same("Reactive", 1, 5)])
    counts = []
    for seconds in (1, 2, 3, 4, 61, 62):
        h.R(some_event(seconds * S))
        counts.append(len(fired(h)))
    assert counts == [0, 1, 0, 1, 0, 1]


def test_f39_after_equals_expect_proactive_does_not_fire(harness: HarnessMaker) -> None:
    a = _same("Proactive", 2, 10)
    h = harness([a])
    for seconds in (1, 2, 3):
        h.R(some_event(seconds * S))
        h.P(a, T + seconds * S)
    h.P(a, T + 10 * S)
    h.P(a, T + 11 * S)
    assert fired(h) == []


def test_f40_after_equals_expect_proactive_fires(harness: HarnessMaker) -> None:
    a = _same("Proactive", 2, 10)
    h = harness([a])
    h.R(some_event(1 * S))
    h.P(a, T + 2 * S)
    assert fired(h) == []
    third = some_event(3 * S)
    h.R(third)
    h.P(a, T + 4 * S)
    assert fired(h) == []
    h.P(a, T + 11 * S)
    [action] = fired(h)
    assert action.triggering_event == third
    h.P(a, T + 30 * S)
    assert fired(h) == []


def test_f41_rapid_fire_immediate(harness: HarnessMaker) -> None:
    a = automation("instant", trigger(expect=["some-event"], threshold=1, within=0))
    h = harness([a])
    events = [
        event("some-event", T + timedelta(microseconds=i), "some.resource", id=UUID(int=i))
        for i in range(50)
    ]
    import random

    random.Random(41).shuffle(events)
    assert h.batch(events) == [Outcome.processed] * 50
    actions = fired(h, a)
    assert len(actions) == 50
    assert {x.triggering_event.id for x in actions if x.triggering_event} == {e.id for e in events}
    assert all(x.triggering_labels == {} for x in actions)


def test_f42_rapid_fire_with_threshold_reverse_order(harness: HarnessMaker) -> None:
    a = automation("ten in a minute", trigger(expect=["some-event"], threshold=10, within=60))
    h = harness([a])
    events = [
        event("some-event", T + timedelta(microseconds=i), "some.resource", id=UUID(int=i))
        for i in range(10)
    ]
    events.reverse()
    for e in events:
        h.R(e)
    [action] = fired(h)
    assert action.triggering_event == events[-1]
    assert action.triggering_labels == {}


def test_f43_event_far_in_the_future_of_the_window(harness: HarnessMaker) -> None:
    a = automation("every 10 s", trigger(expect=["some-event"], threshold=1, within=10))
    h = harness([a])
    h.R(some_event(0 * S))
    assert len(fired(h)) == 1
    h.R(some_event(999 * S))
    assert len(fired(h)) == 1


ZOMBIES = automation(
    "zombies",
    trigger(
        match=FLOW_RUN_ID,
        after=["prefect.flow-run.heartbeat"],
        expect=["prefect.flow-run.*"],
        for_each=["prefect.resource.id"],
        posture="Proactive",
        threshold=1,
        within=90,
    ),
)


def test_f45_zombie_detection_fires_when_heartbeats_stop(harness: HarnessMaker) -> None:
    h = harness([ZOMBIES])
    run = "prefect.flow-run.zzz"
    h.R(event("prefect.flow-run.heartbeat", T, run))
    last = event("prefect.flow-run.heartbeat", T + 30 * S, run)
    h.R(last)
    h.P(ZOMBIES, T + 31 * S)
    assert fired(h) == []
    h.P(ZOMBIES, T + 121 * S)
    [action] = fired(h)
    assert action.triggering_event == last
    assert action.triggering_labels == {"prefect.resource.id": run}


def test_f44_zombie_heartbeats_keep_it_quiet(harness: HarnessMaker) -> None:
    """Heartbeats every 60 s keep restarting the 90 s window: never fires."""
    h = harness([ZOMBIES])
    run = "prefect.flow-run.alive"
    for minute in range(6):
        h.R(event("prefect.flow-run.heartbeat", T + minute * M, run))
        h.P(ZOMBIES, T + minute * M + 30 * S)
    assert fired(h) == []


def test_f46_zombie_completed_run_is_not_a_zombie(harness: HarnessMaker) -> None:
    """A run that completes inside the window is not reported; the key is forgotten."""
    h = harness([ZOMBIES])
    run = "prefect.flow-run.done"
    h.R(event("prefect.flow-run.heartbeat", T, run))
    h.R(event("prefect.flow-run.Completed", T + 10 * S, run))
    for seconds in (20, 100, 200, 400):
        h.P(ZOMBIES, T + seconds * S)
    assert fired(h) == []
    assert h.buckets() == []


# --- g47-g51 flow-run SLAs, then f52-f59 regressions -------------------------------------


def _sla_events() -> list[Any]:
    def run(name: str, at: int, who: str) -> Any:
        return event(f"prefect.flow-run.{name}", T + at * S, f"prefect.flow-run.{who}")

    fast = [
        run("scheduled", 1, "FASTBOI-1"),
        run("pending", 2, "FASTBOI-1"),
        run("running", 3, "FASTBOI-1"),
        run("completed", 10, "FASTBOI-1"),
        run("pending", 22, "FASTBOI-2"),
        run("running", 23, "FASTBOI-2"),
        run("completed", 30, "FASTBOI-2"),
    ]
    slow = [
        run("scheduled", 2, "SLOWBOI"),
        run("pending", 3, "SLOWBOI"),
        run("running", 4, "SLOWBOI"),
    ]
    return sorted(fast + slow, key=lambda e: e.occurred)


def _stuck(expect: list[str]) -> Any:
    return automation(
        "stuck flow runs",
        trigger(
            match=FLOW_RUN_ID,
            for_each=["prefect.resource.id"],
            after=["prefect.flow-run.running"],
            expect=expect,
            posture="Proactive",
            threshold=1,
            within=60,
        ),
    )


STUCK = _stuck(["prefect.flow-run.completed", "prefect.flow-run.cancelled"])


def test_g47_coverage() -> None:
    covered = {
        "prefect.flow-run.running",
        "prefect.flow-run.completed",
        "prefect.flow-run.cancelled",
    }
    events = [e for e in _sla_events() if e.event in covered]
    assert events
    assert all(only_trigger(STUCK).covers(e) for e in events)


def _only_the_stuck_flow_triggers(h: Any, a: Any) -> None:
    events = _sla_events()
    for e in events:
        h.R(e)
    assert fired(h) == []
    h.P(a, T + 50 * S)
    assert fired(h) == []
    h.P(a, T + 64 * S)
    [action] = fired(h)
    assert action.triggering_labels == {"prefect.resource.id": "prefect.flow-run.SLOWBOI"}
    assert action.triggering_event == events[5]
    assert events[5].event == "prefect.flow-run.running"


def test_g48_only_the_stuck_flow_triggers(harness: HarnessMaker) -> None:
    _only_the_stuck_flow_triggers(harness([STUCK]), STUCK)


def test_g49_wildcard_expect_that_is_a_superset(harness: HarnessMaker) -> None:
    wildcard = _stuck(["prefect.flow-run.*"])
    _only_the_stuck_flow_triggers(harness([wildcard]), wildcard)


def test_g50_react_only_to_scheduled_flows_completing(harness: HarnessMaker) -> None:
    a = automation(
        "scheduled run notifications",
        trigger(
            match=FLOW_RUN_ID,
            for_each=["prefect.resource.id"],
            after=["prefect.flow-run.scheduled"],
            expect=["prefect.flow-run.completed"],
            threshold=0,
        ),
    )
    h = harness([a])
    events = _sla_events()
    for e in events:
        h.R(e)
    [action] = fired(h)
    assert action.triggering_labels == {"prefect.resource.id": "prefect.flow-run.FASTBOI-1"}
    assert action.triggering_event == events[6]


def test_g51_any_state_after_pending(harness: HarnessMaker) -> None:
    a = automation(
        "get ready",
        trigger(
            match=FLOW_RUN_ID,
            for_each=["prefect.resource.id"],
            after=["prefect.flow-run.pending"],
            threshold=0,
        ),
    )
    h = harness([a])
    for e in _sla_events():
        h.R(e)
    assert len(fired(h)) == 3


def _issue(expect: str) -> Any:
    return automation(
        "regression",
        trigger(
            match=FLOW_RUN_ID,
            match_related={
                "prefect.resource.id": ["prefect.flow.f1f1f1f1", "prefect.flow.f2f2f2f2"],
                "prefect.resource.role": "flow",
            },
            for_each=["prefect.resource.id"],
            after=["prefect.flow-run.Running"],
            expect=[expect],
            posture="Proactive",
            within=7200,
            threshold=1,
        ),
    )


A3521 = _issue("prefect.flow-run.*")
A3244 = _issue("prefect.flow-run.Completed")
FLOW_F1 = {"prefect.resource.id": "prefect.flow.f1f1f1f1", "prefect.resource.role": "flow"}
FR = "prefect.flow-run.frfrfrfr"


def _run(name: str, minutes: int, follows: Any = None) -> Any:
    return event(
        f"prefect.flow-run.{name}",
        T + minutes * M,
        FR,
        related=[FLOW_F1],
        follows=follows,
        received=T,
    )


def _sequence(completed_first: bool) -> list[Any]:
    pending = _run("Pending", 0)
    running = _run("Running", 1, pending.id)
    completed = _run("Completed", 4, running.id)
    log = event("prefect.log.write", T + 2 * M, FR, related=[FLOW_F1], received=T)
    head = [pending, completed, log, running] if completed_first else [pending, running, log]
    tail: list[Any] = [T + 3 * M]
    tail += [T + 4 * M] if completed_first else [completed]
    tail += [T + m * M for m in (5, 119, 120, 121, 123, 124, 125, 250)]
    return head + tail


def _play(h: Any, a: Any, items: list[Any], skip_completed: bool = False) -> list[int]:
    counts = []
    for item in items:
        if isinstance(item, datetime):
            h.P(a, item)
        elif skip_completed and item.event == "prefect.flow-run.Completed":
            continue
        else:
            h.batch([item], now=T)
        counts.append(len(fired(h)))
    return counts


def test_f52_regression_3521_negative(harness: HarnessMaker) -> None:
    h = harness([A3521])
    assert sum(_play(h, A3521, _sequence(completed_first=False))) == 0


def test_f53_regression_3521_positive(harness: HarnessMaker) -> None:
    h = harness([A3521])
    assert sum(_play(h, A3521, _sequence(completed_first=False), skip_completed=True)) == 1


def test_f54_regression_3521_side_quest(harness: HarnessMaker) -> None:
    h = harness([A3521])
    items = [i for i in _sequence(completed_first=False) if not isinstance(i, datetime)]
    for item in items:
        if item.event != "prefect.flow-run.Completed":
            h.batch([item], now=T)
    assert fired(h) == []
    h.P(A3521, T + 250 * M)
    assert len(fired(h)) == 1
    h.P(A3521, T + 251 * M)
    h.P(A3521, T + 450 * M)
    assert fired(h) == []


def test_f55_regression_3244_negative(harness: HarnessMaker) -> None:
    h = harness([A3244])
    pending, completed, *rest = _sequence(completed_first=True)
    assert h.batch([pending], now=T) == [Outcome.processed]
    assert h.batch([completed], now=T) == [Outcome.parked]
    assert sum(_play(h, A3244, rest)) == 0


def test_f56_regression_3244_positive(harness: HarnessMaker) -> None:
    h = harness([A3244])
    assert sum(_play(h, A3244, _sequence(completed_first=True), skip_completed=True)) == 1


A3803 = automation(
    "regression 3803",
    trigger(
        match=FLOW_RUN_ID,
        for_each=["prefect.resource.id"],
        after=["prefect.flow-run.Pending"],
        expect=["prefect.flow-run.*"],
        posture="Proactive",
        within=300,
        threshold=1,
    ),
)


def _pending_20_minutes_ago(h: Any) -> None:
    h.R(event("prefect.flow-run.Pending", T - 20 * M, FR, received=T), now=T)
    h.P(A3803, T + 1 * M)
    h.P(A3803, T + 4 * M)
    assert fired(h) == []


def test_f57_regression_3803_negative(harness: HarnessMaker) -> None:
    h = harness([A3803])
    _pending_20_minutes_ago(h)
    h.R(event("prefect.flow-run.Running", T - 19 * M, FR, received=T), now=T)
    h.P(A3803, T + 6 * M)
    assert fired(h) == []


def test_f58_regression_3803_positive_no_events_at_all(harness: HarnessMaker) -> None:
    h = harness([A3803])
    _pending_20_minutes_ago(h)
    h.P(A3803, T + 6 * M)
    assert len(fired(h)) == 1


def test_f59_regression_3803_positive_unrelated_event_advances_clock(harness: HarnessMaker) -> None:
    h = harness([A3803])
    _pending_20_minutes_ago(h)
    h.R(event("something.else", T - 6 * M, "any.other.resource", id=uuid4(), received=T), now=T)
    h.P(A3803, T + 6 * M)
    assert len(fired(h)) == 1


def test_proactive_returns_next_run_and_skips_until_due(harness: HarnessMaker) -> None:
    h = harness(EFFECTIVE)
    with h.conn:
        wake = h.engine.proactive(h.conn, T)
    assert wake == T + 30 * S  # CHONK_SADNESS: as_of + within, offset 0
    with h.conn:
        assert h.engine.proactive(h.conn, T + 10 * S) == T + 30 * S
    with h.conn:
        h.engine.proactive(h.conn, T + 30 * S)
    assert [x.automation.id for x in fired(h)] == [CHONK_SADNESS.id]


# --- a pass reads what is due, and runs the same in steps ---------------------------------


def watchdog(*, after: bool, threshold: int = 1, name: str = "watchdog") -> Automation:
    return automation(
        name,
        trigger(
            posture="Proactive",
            after=["device.heartbeat"] if after else [],
            expect=["device.heartbeat"],
            for_each=["prefect.resource.id"],
            threshold=threshold,
            within=60,
        ),
    )


def put_buckets(h: Harness, a: Automation, buckets: Sequence[tuple[int, int, int]]) -> None:
    """Buckets `(end offset s from T, count, length s)` of keys k0, k1, ..."""
    with h.conn:
        for i, (end, count, length) in enumerate(buckets):
            stop = T + end * S
            bucket = Bucket((f"k{i}",), stop - length * S, stop, count)
            write_bucket(h.conn, str(a.trigger.id), str(a.id), bucket, proactive=True)


def table(h: Harness) -> list[tuple[object, ...]]:
    return h.conn.execute(
        "SELECT bucketing_key, start_us, end_us, count FROM buckets ORDER BY bucketing_key"
    ).fetchall()


def fired_keys(h: Harness) -> list[str]:
    return sorted(str(x.firing and x.firing.triggering_labels) for x in h.actions())


class BucketRowsRead:
    """A row tracer counting the rows read from the buckets table."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, cursor: apsw.Cursor, row: tuple[object, ...]) -> tuple[object, ...]:
        if "FROM buckets" in (cursor.expanded_sql or ""):
            self.rows += 1
        return row


def test_a_pass_reads_only_the_due_buckets(harness: HarnessMaker) -> None:
    """1,000 open windows and 3 over: the pass reads 3 bucket rows, and fires 3 times."""
    a = watchdog(after=True)
    h = harness([a])
    put_buckets(h, a, [(1 + i, 0, 60) for i in range(1_000)] + [(-5, 0, 60)] * 3)
    read = BucketRowsRead()
    h.conn.row_trace = read
    with h.conn:
        wake = h.engine.proactive(h.conn, T)
    h.conn.row_trace = None
    assert read.rows <= 2 * 3 + 1  # the due rows (noted, then read), the earliest open end
    assert len(fired(h)) == 3
    assert wake == T + 1 * S  # the earliest open window's end


bucket_rows = st.lists(
    st.tuples(st.integers(-90, 90), st.integers(-1, 3), st.sampled_from([0, 30, 60, 600])),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    buckets=bucket_rows,
    limit=st.integers(1, 8),
    after=st.booleans(),
    threshold=st.integers(1, 3),
)
def test_a_pass_in_steps_leaves_what_one_pass_leaves(
    buckets: list[tuple[int, int, int]], limit: int, after: bool, threshold: int
) -> None:
    """`proactive_step` with any limit ends where `proactive` does: the same buckets,
    the same firings, the same next run; each step reads or deletes at most about `limit`."""
    a = watchdog(after=after, threshold=threshold)
    with tempfile.TemporaryDirectory() as tmp:
        whole, stepped = Harness(Path(tmp) / "w.db", [a]), Harness(Path(tmp) / "s.db", [a])
        try:
            for h in (whole, stepped):
                put_buckets(h, a, buckets)
            with whole.conn:
                wake = whole.engine.proactive(whole.conn, T)
            pass_ = stepped.engine.begin_proactive(T)
            steps = 0
            read = BucketRowsRead()
            stepped.conn.row_trace = read
            while not pass_.done:
                read.rows = 0
                with stepped.conn:
                    stepped.engine.proactive_step(stepped.conn, pass_, limit)
                steps += 1
                assert steps <= 2 * len(buckets) + 3  # each due bucket noted, then evaluated
                assert read.rows <= limit + 1  # and the earliest open end
            stepped.conn.row_trace = None
            assert pass_.next_run == wake
            assert table(stepped) == table(whole)
            assert fired_keys(stepped) == fired_keys(whole)
            # the next pass is scheduled alike
            assert stepped.engine.next_proactive_runs == whole.engine.next_proactive_runs
        finally:
            whole.close()
            stepped.close()


def test_a_reload_between_steps_skips_the_rest_of_the_trigger(harness: HarnessMaker) -> None:
    a = watchdog(after=True)
    h = harness([a])
    put_buckets(h, a, [(-5, 0, 60)] * 4)
    pass_ = h.engine.begin_proactive(T)
    with h.conn:  # 4 due buckets noted, 2 evaluated
        assert not h.engine.proactive_step(h.conn, pass_, 6)
    assert len(fired(h)) == 2
    with h.conn:
        h.engine.load_automations(h.conn, [a], T)  # unchanged: keeps its buckets
    with h.conn:
        assert h.engine.proactive_step(h.conn, pass_, 6)
    assert fired(h) == []
    with h.conn:
        h.engine.proactive(h.conn, T)  # due again after the reload: the rest fire now
    assert len(fired(h)) == 2


def test_a_steps_firings_are_its_lines_without_those_of_a_trigger_rolled_back(
    harness: HarnessMaker,
) -> None:
    """The engine logs no firing: a step's are `pass_.firings`, for the caller to log
    after its commit. A trigger that fails half-way rolls back to its savepoint, and the
    line of the firing it had made goes with it; the other trigger's lines stay."""
    failing, working = watchdog(after=True), watchdog(after=True, name="kennel")
    h = harness([failing, working])
    for a in (failing, working):
        put_buckets(h, a, [(-5, 0, 60)] * 2)
    h.conn.execute(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.outbox"
        f" WHEN NEW.automation_id = '{failing.id}' AND"
        " (SELECT count(*) FROM main.outbox WHERE automation_id = NEW.automation_id) >= 1"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    pass_ = h.engine.begin_proactive(T)
    with h.conn:
        assert h.engine.proactive_step(h.conn, pass_, 100)
    made = fired(h)
    assert {x.automation.id for x in made} == {working.id}
    assert sorted(str(line.firing) for line in pass_.firings) == sorted(
        str(x.firing.id) for x in made if x.firing is not None
    )
    assert [(line.automation, line.actions) for line in pass_.firings] == [("kennel", 1)] * 2
