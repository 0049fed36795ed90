"""The engine against a literal transcription of Prefect's rules as docs/TRIGGERS.md states them,
#which-triggers-see-an-event to #scheduling-and-the-sweeper (differential).

`Reference` below is those rules written out with a dict for the bucket
table and the events clock as two numbers, sharing no code with the engine. Hypothesis
drives both with the same random interleaving of reactive evaluations, proactive
evaluations and periodic sweeps (wall clock moving forward, events occurring in the past
or slightly in the future) and every firing and every bucket row must agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.core.clock import to_us
from daemon.core.events import ReceivedEvent
from tests.support.engine_harness import Harness, T, automation, event, trigger

LOOKBACK = timedelta(minutes=15)
BUFFER = timedelta(seconds=60)
# NAMES include the quirks of docs/TRIGGERS.md#which-triggers-see-an-event.
NAMES = ["a", "b", "a.x", "c", "a.", "", "!a", "ab", "a*"]
PATTERNS = ["a", "b", "a.*", "c", "!a", "*", "a.x*", "a*", "!a.*"]
RESOURCES = ["r1", "r2"]


@dataclass
class Row:
    key: tuple[str, ...]
    start: datetime
    end: datetime
    count: int
    last_event: ReceivedEvent | None = None


@dataclass
class Reference:
    """Those rules for one top-level EventTrigger, transcribed."""

    after: frozenset[str]
    expect: frozenset[str]
    for_each: tuple[str, ...]
    reactive: bool
    threshold: int
    within: timedelta
    rows: dict[tuple[str, ...], Row] = field(default_factory=dict)
    fires: list[tuple[dict[str, str], UUID | None]] = field(default_factory=list)
    clock: datetime | None = None
    updated: datetime | None = None

    # docs/TRIGGERS.md#matching-rules
    def _matches(self, pattern: str, value: str) -> bool:
        if pattern.startswith("!"):
            return not fnmatchcase(value, pattern[1:])
        return fnmatchcase(value, pattern)

    def expects(self, name: str) -> bool:
        return not self.expect or any(self._matches(p, name) for p in self.expect)

    def starts_after(self, name: str) -> bool:
        return any(self._matches(p, name) for p in self.after)

    def interested(self, name: str) -> bool:
        keys = {"*"} if not self.expect else self.expect | self.after
        if not any(fnmatchcase(name, k) for k in keys):
            return False
        if not self.expect:
            regex = ".+"
        else:
            regex = "|".join(re.escape(p).replace("\\*", ".+") for p in self.expect | self.after)
        return re.match(regex, name) is not None

    def meets(self, count: int) -> bool:
        return count >= self.threshold if self.reactive else count < self.threshold

    # docs/TRIGGERS.md#the-events-clock
    def update_clock(self, occurred: datetime, now: datetime) -> None:
        ts = min(occurred, now)
        if self.clock is None or ts >= self.clock:
            self.clock = ts
        self.updated = now

    def offset(self) -> timedelta:
        if self.clock is None or self.updated is None:
            return timedelta(0)
        return self.clock - self.updated

    # bucket primitives (docs/TRIGGERS.md#reactive-evaluation, #bucket-lifecycle)
    def ensure(
        self,
        key: tuple[str, ...],
        start: datetime,
        end: datetime,
        last: ReceivedEvent | None,
        initial: int = 0,
    ) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, start, end, initial, last)
        elif last is not None:
            self.rows[key].last_event = last
        return self.rows[key]

    def start_new(
        self,
        key: tuple[str, ...],
        start: datetime,
        end: datetime,
        count: int,
        last: ReceivedEvent | None = None,
    ) -> Row:
        self.rows[key] = Row(key, start, end, count, last)
        return self.rows[key]

    # docs/TRIGGERS.md#reactive-evaluation
    def reactive_evaluation(self, e: ReceivedEvent, now: datetime) -> None:
        self.update_clock(e.occurred, now)
        if not self.interested(e.event):
            return
        key = tuple(e.resource.root.get(label, "") for label in self.for_each)
        bucket: Row | None = None
        expects = self.expects(e.event)
        if self.after and self.starts_after(e.event):
            initial = -1 if expects else 0
            bucket = self.ensure(key, e.occurred, e.occurred + self.within, e, initial)
        if bucket is None and not self.after and expects:
            bucket = self.ensure(key, e.occurred - LOOKBACK, e.occurred + self.within, e)
        if not expects:
            return
        if bucket is None:
            bucket = self.rows.get(key)
            if bucket is None:
                return
        self.evaluate(bucket, e.occurred, e)

    # docs/TRIGGERS.md#bucket-lifecycle
    def evaluate(self, b: Row, now: datetime, ev: ReceivedEvent | None) -> Row | None:
        count = 1 if ev is not None else 0
        if now < b.start:
            return b
        immediate = self.reactive and self.within == timedelta(0)
        if count and (immediate or b.start <= now < b.end):
            b.count += 1
            b.last_event = ev
            count = 0
        ready = self.reactive or b.end <= now
        meets = self.meets(b.count)
        if ready and meets:
            labels = dict(zip(self.for_each, b.key, strict=True))
            by = ev if ev is not None else b.last_event
            self.fires.append((labels, None if by is None else by.id))
            self.rows.pop(b.key, None)
        elif now < b.end:
            if (
                ev is not None
                and not self.reactive
                and not meets
                and self.starts_after(ev.event)
                and self.expects(ev.event)
            ):
                self.rows.pop(b.key, None)
                return self.start_new(b.key, ev.occurred, ev.occurred + self.within, 0, ev)
            return b
        if self.after:
            self.rows.pop(b.key, None)
            return None
        if self.within == timedelta(0):
            return None
        start = max(b.end, now)
        end = start + self.within
        if self.reactive and count > 0:
            return self.evaluate(self.start_new(b.key, start, end, 0), now, ev)
        return self.start_new(b.key, start, end, count)

    # docs/TRIGGERS.md#proactive-evaluation
    def proactive_evaluation(self, wall: datetime) -> datetime:
        as_of = wall + self.offset()
        run_again_at = as_of + self.within
        if not self.for_each:
            self.ensure((), as_of, as_of + self.within, None)
        for key in [k for k, r in self.rows.items() if r.count >= self.threshold]:
            del self.rows[key]
        # ordered by start (ties are unspecified in Prefect; trigd breaks them by key)
        for row in sorted(self.rows.values(), key=lambda r: (r.start, _key_json(r.key))):
            following = self.evaluate(row, as_of, None)
            if following is not None and as_of < following.end < run_again_at:
                run_again_at = following.end
        return run_again_at

    # docs/TRIGGERS.md#scheduling-and-the-sweeper
    def periodic(self, wall: datetime) -> None:
        cutoff = wall + self.offset() - BUFFER
        for key in [k for k, r in self.rows.items() if r.end <= cutoff]:
            del self.rows[key]

    def table(self) -> list[tuple[str, int, int, int, str | None]]:
        return sorted(
            (
                _key_json(r.key),
                to_us(r.start),
                to_us(r.end),
                r.count,
                None if r.last_event is None else str(r.last_event.id),
            )
            for r in self.rows.values()
        )


def _key_json(key: tuple[str, ...]) -> str:
    return "[" + ",".join(f'"{k}"' for k in key) + "]"


def _engine_table(h: Harness) -> list[tuple[str, int, int, int, str | None]]:
    rows: list[tuple[Any, ...]] = h.conn.execute(
        "SELECT bucketing_key, start_us, end_us, count, last_event FROM buckets"
    ).fetchall()
    return sorted(
        (
            str(key),
            int(start),
            int(end),
            int(count),
            None if last is None else str(ReceivedEvent.model_validate_json(str(last)).id),
        )
        for key, start, end, count, last in rows
    )


def _fired(h: Harness, wall: datetime) -> list[tuple[dict[str, str], UUID | None]]:
    """The firings since the last step; each must carry the wall clock
    (docs/TRIGGERS.md#firings)."""
    actions = h.new_actions()
    assert all(x.triggered == wall for x in actions)
    return [
        (x.triggering_labels, None if x.triggering_event is None else x.triggering_event.id)
        for x in actions
    ]


_patterns = st.frozensets(st.sampled_from(PATTERNS), max_size=2)
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("R"),
            st.sampled_from(NAMES),
            st.sampled_from(RESOURCES),
            st.integers(-120, 20),  # occurred relative to the wall clock (s)
            st.integers(0, 25),  # wall clock advance before the step (s)
        ),
        st.tuples(st.just("P"), st.integers(0, 40)),
        st.tuples(st.just("PER"), st.integers(0, 90)),
    ),
    max_size=25,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    after=_patterns,
    expect=_patterns,
    for_each=st.booleans(),
    reactive=st.booleans(),
    threshold=st.integers(-1, 3),
    within=st.sampled_from([0, 10, 30]),
    ops=_ops,
)
def test_engine_follows_the_semantics_step_by_step(
    tmp_path_factory: pytest.TempPathFactory,
    after: frozenset[str],
    expect: frozenset[str],
    for_each: bool,
    reactive: bool,
    threshold: int,
    within: int,
    ops: list[tuple[Any, ...]],
) -> None:
    if not reactive:
        within = max(within, 10)  # Proactive minimum (docs/TRIGGERS.md#event-triggers)
    a = automation(
        "reference",
        trigger(
            after=sorted(after),
            expect=sorted(expect),
            for_each=["prefect.resource.id"] if for_each else [],
            posture="Reactive" if reactive else "Proactive",
            threshold=threshold,
            within=within,
        ),
    )
    ref = Reference(
        after,
        expect,
        ("prefect.resource.id",) if for_each else (),
        reactive,
        threshold,
        timedelta(seconds=within),
    )
    h = Harness(tmp_path_factory.mktemp("ref") / "trigd.db", [a])
    try:
        wall = T
        for step, op in enumerate(ops):
            if op[0] == "R":
                _, name, resource, offset, advance = op
                wall += timedelta(seconds=advance)
                e = event(name, wall + timedelta(seconds=offset), resource, received=wall)
                h.R(e, wall)
                ref.reactive_evaluation(e, wall)
            elif op[0] == "P":
                wall += timedelta(seconds=op[1])
                assert h.P(a, wall) == ref.proactive_evaluation(wall), step
            else:
                wall += timedelta(seconds=op[1])
                h.PER(wall)
                ref.periodic(wall)
            assert _fired(h, wall) == ref.fires, (step, op)
            ref.fires.clear()
            assert _engine_table(h) == ref.table(), (step, op)
    finally:
        h.close()


# --- the same, through process_batch with causal ordering (docs/ORDERING.md#the-algorithm) ---

SEEN_FOR = timedelta(hours=1)  # trigd's seen expiration (docs/ORDERING.md#seen-ids)
LOG_WRITE = "prefect.log.write"


@dataclass
class Pipeline(Reference):
    """Reference plus docs/ORDERING.md#the-algorithm, docs/PROTOCOL.md#duplicates, the skipped log
    events of docs/TRIGGERS.md#which-triggers-see-an-event, and the events
    trigd makes when it fires (they reach the next drain and move the events clock)."""

    stored: set[UUID] = field(default_factory=set)
    seen: dict[UUID, datetime] = field(default_factory=dict)
    parked: dict[UUID, ReceivedEvent] = field(default_factory=dict)
    undrained: list[datetime] = field(default_factory=list)
    """Wall times of the firings whose events wait for the next drain."""

    def is_seen(self, event_id: UUID, now: datetime) -> bool:
        at = self.seen.get(event_id)
        return at is not None and at > now - SEEN_FOR

    def handle(self, e: ReceivedEvent, now: datetime, depth: int = 0) -> None:
        """reactive_evaluation through preceding_event_confirmed
        (docs/TRIGGERS.md#reactive-evaluation, docs/ORDERING.md#the-algorithm)."""
        self.update_clock(e.occurred, now)
        if depth > 20:
            raise OverflowError
        leader = e.follows
        waits = leader is not None and leader != e.id
        if (
            leader is not None
            and waits
            and now - e.received < LOOKBACK
            and not self.is_seen(leader, now)
        ):
            self.parked[e.id] = e
            return
        fired_before = len(self.fires)
        self.reactive_evaluation(e, now)  # repeats the clock update: harmless
        self.undrained += [now] * (len(self.fires) - fired_before)
        self.seen[e.id] = now
        waiting = sorted(
            (f for f in self.parked.values() if f.follows == e.id),
            key=lambda f: (f.occurred, str(f.id)),
        )
        for follower in waiting:
            try:
                self.handle(follower, now, depth + 1)
            except OverflowError:
                break
        if leader is not None and leader != e.id:
            self.parked.pop(e.id, None)

    def batch(self, events: list[ReceivedEvent], now: datetime) -> None:
        for e in events:
            if e.id in self.stored:
                continue  # duplicate (docs/PROTOCOL.md#duplicates: by stored id)
            self.stored.add(e.id)
            if e.event == LOG_WRITE:
                continue
            self.handle(e, now)
        # the drain: each firing made a state-change event and an action event, both
        # occurred at the firing's wall time; none is covered (match is r*)
        while self.undrained:
            fired_at = self.undrained.pop(0)
            self.update_clock(fired_at, now)
            self.update_clock(fired_at, now)

    def proactive(self, wall: datetime) -> datetime:
        fired_before = len(self.fires)
        result = self.proactive_evaluation(wall)
        self.undrained += [wall] * (len(self.fires) - fired_before)
        return result

    def periodic_pass(self, wall: datetime) -> None:
        as_of_offset = self.offset()
        lost = sorted(
            (f for f in self.parked.values() if f.received <= wall - LOOKBACK),
            key=lambda f: (f.occurred, str(f.id)),
        )
        for f in lost:
            del self.parked[f.id]
        for f in lost:
            self.handle(f, wall)
        cutoff = wall + as_of_offset - BUFFER
        for key in [k for k, r in self.rows.items() if r.end <= cutoff]:
            del self.rows[key]


_pipeline_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("B"),
            st.lists(
                st.tuples(
                    st.sampled_from([*NAMES, LOG_WRITE]),
                    st.sampled_from(RESOURCES),
                    st.integers(-120, 20),  # occurred relative to the wall clock (s)
                    st.one_of(st.none(), st.integers(0, 30)),  # follows: index of an event
                ),
                min_size=1,
                max_size=3,
            ),
            st.integers(0, 25),
        ),
        st.tuples(st.just("DUP"), st.integers(0, 30), st.integers(0, 5)),
        st.tuples(st.just("P"), st.integers(0, 40)),
        st.tuples(st.just("PER"), st.sampled_from([0, 30, 61, 600, 900, 1000])),
    ),
    max_size=25,
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    after=_patterns,
    expect=_patterns,
    for_each=st.booleans(),
    reactive=st.booleans(),
    threshold=st.integers(-1, 3),
    within=st.sampled_from([0, 10, 30]),
    ops=_pipeline_ops,
)
def test_batches_with_causal_ordering_follow_the_semantics(
    tmp_path_factory: pytest.TempPathFactory,
    after: frozenset[str],
    expect: frozenset[str],
    for_each: bool,
    reactive: bool,
    threshold: int,
    within: int,
    ops: list[tuple[Any, ...]],
) -> None:
    if not reactive:
        within = max(within, 10)
    a = automation(
        "pipeline",
        trigger(
            match={"prefect.resource.id": "r*"},
            after=sorted(after),
            expect=sorted(expect),
            for_each=["prefect.resource.id"] if for_each else [],
            posture="Reactive" if reactive else "Proactive",
            threshold=threshold,
            within=within,
        ),
    )
    model = Pipeline(
        after,
        expect,
        ("prefect.resource.id",) if for_each else (),
        reactive,
        threshold,
        timedelta(seconds=within),
    )
    ids = [UUID(int=i + 1) for i in range(32)]  # event i has id ids[i]; follows point here
    sent: list[ReceivedEvent] = []
    h = Harness(tmp_path_factory.mktemp("pipe") / "trigd.db", [a])
    try:
        wall = T
        for step, op in enumerate(ops):
            if op[0] == "B":
                wall += timedelta(seconds=op[2])
                events = []
                for name, resource, offset, follows in op[1]:
                    if len(sent) >= len(ids):
                        break
                    e = event(
                        name,
                        wall + timedelta(seconds=offset),
                        resource,
                        received=wall,
                        id=ids[len(sent)],
                        follows=None if follows is None else ids[follows],
                    )
                    sent.append(e)
                    events.append(e)
                h.batch(events, wall)
                model.batch(events, wall)
            elif op[0] == "DUP":
                if not sent:
                    continue
                wall += timedelta(seconds=op[2])
                again = [sent[op[1] % len(sent)]]
                h.batch(again, wall)
                model.batch(again, wall)
            elif op[0] == "P":
                wall += timedelta(seconds=op[1])
                assert h.P(a, wall) == model.proactive(wall), step
            else:
                wall += timedelta(seconds=op[1])
                h.PER(wall)
                model.periodic_pass(wall)
            assert _fired(h, wall) == model.fires, (step, op)
            model.fires.clear()
            assert _engine_table(h) == model.table(), (step, op)
            clock = h.engine.clock
            assert (clock.clock, clock.updated_us) == (
                model.clock,
                None if model.updated is None else to_us(model.updated),
            ), (step, op)
            parked = {
                str(r[0]) for r in h.conn.execute("SELECT follower_id FROM ordering_followers")
            }
            assert parked == {str(i) for i in model.parked}, (step, op)
    finally:
        h.close()
