"""`trigd backtest` (docs/INSIGHT.md#backtest): what automations would have fired on the
stored events, and how that differs from what the loaded ones really fired.

Theory of operation. The live database is only read (`store/events.py: rows_in_occurred_order`,
on the caller's read-only connection). Its events are replayed in `occurred` order
through a real `Engine` on a scratch store (`Engine.replay_batch`: the rows as read,
each parsed only when a trigger needs more than its columns), in batches (one
transaction each), with the replayed events' time as the wall clock: `now` is the
newest `occurred` of the batch, so the events clock, causal ordering's seen marks and
proactive evaluation all run on the replayed events' clock. A proactive pass runs
whenever event time reaches the time the previous pass asked to run again, and a last
pass at `until`. The periodic pass (lost followers, the bucket sweep) runs as the
daemon's sweeper does, on its own schedule: at the ticks `since + k * granularity` of
event time, before the first event past each, and at `until`. (A bucket of a
`within: 0` trigger without `after` is left to the sweep, as in Prefect, so when the
sweep runs decides whether a later event counts in it.)

What is not replayed: events that no trigger's `expect`/`after` names and that no
replayed event `follows` (they change nothing a trigger sees), and the events trigd made
about the automations under test (the scratch engine makes its own). Firings are read
back as both sides record them, from `prefect.automation.triggered` events, and compared
by (automation, bucket labels, triggering event), or by the firing's time when there is
no triggering event.
"""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import apsw
import attrs
from pydantic import ValidationError

from daemon.core.automations import Automation, Posture
from daemon.core.clock import from_us, to_us
from daemon.core.config import InsightConfig
from daemon.core.events import ReceivedEvent
from daemon.core.explanation import iso
from daemon.engine.engine import Engine
from store import events as events_store
from store import insight
from store.connection import Connection


@attrs.frozen(order=True)
class Firing:
    """One firing as both sides can tell it."""

    fired: datetime
    """Event time: the triggering event's `occurred`, else when it fired (proactive)."""
    automation_id: str
    labels: str
    """The bucket's `for_each` labels as sorted JSON ("{}" for one bucket)."""
    triggering_event: str | None
    triggering_name: str | None

    def identity(self) -> tuple[str, str, str]:
        return (
            self.automation_id,
            self.labels,
            self.triggering_event or f"at {iso(self.fired)}",
        )

    def document(self, names: Mapping[str, str]) -> dict[str, Any]:
        return {
            "fired": iso(self.fired),
            "automation": names.get(self.automation_id, self.automation_id),
            "automation_id": self.automation_id,
            "labels": json.loads(self.labels),
            "triggering_event": self.triggering_event,
            "triggering_event_name": self.triggering_name,
        }


def read_firings(conn: apsw.Connection, automation_ids: Sequence[str]) -> list[Firing]:
    """The firings recorded in a store for these automations, oldest first."""
    firings = []
    for data in insight.all_firing_events(conn, automation_ids):
        try:
            event = ReceivedEvent.model_validate_json(data)
        except ValidationError:
            continue
        payload = event.payload
        triggering = payload.get("triggering_event")
        if not isinstance(triggering, dict):
            triggering = None
        try:
            fired = (
                event.occurred
                if triggering is None
                else ReceivedEvent.model_validate(triggering).occurred
            )
        except ValidationError:
            fired = event.occurred
        labels = payload.get("triggering_labels")
        firings.append(
            Firing(
                fired,
                event.resource.id.removeprefix("prefect.automation."),
                json.dumps(labels if isinstance(labels, dict) else {}, sort_keys=True),
                None if triggering is None else str(triggering.get("id")),
                None if triggering is None else str(triggering.get("event")),
            )
        )
    return sorted(firings)


BUCKET_CACHE: Final[int] = InsightConfig.model_fields["backtest_bucket_cache"].default
"""Buckets a replay keeps in memory between batches by default (`[insight]
backtest_bucket_cache`)."""
SEEN_CACHE: Final[int] = InsightConfig.model_fields["backtest_seen_cache"].default
"""Seen marks a replay keeps in memory instead of writing them, by default (`[insight]
backtest_seen_cache`)."""


@attrs.frozen
class Replay:
    firings: list[Firing]
    replayed: int
    """Events evaluated by the scratch engine."""
    skipped: int
    """Stored events in the window that no trigger could see (not replayed)."""


def replay(
    source: apsw.Connection,
    scratch: Connection,
    engine: Engine,
    automations: Sequence[Automation],
    since: datetime,
    until: datetime,
    *,
    batch: int,
    granularity: timedelta,
    bucket_cache: int = BUCKET_CACHE,
    seen_cache: int = SEEN_CACHE,
) -> Replay:
    """Replay the events of `source` that occurred in [since, until) through `automations`
    on `engine` over the empty store `scratch`; the firings they made there.

    `engine` keeps up to `bucket_cache` buckets and `seen_cache` seen marks in memory
    between batches (`scratch` is written by it alone, and thrown away after), and none
    once the replay is over. The replayed events are not stored in `scratch`: only the
    firings are read from it (events the replay made; the source's own firings of
    `automations` are not replayed)."""
    with _held_in_memory(engine, scratch, bucket_cache, seen_cache):
        with scratch:
            engine.load_automations(scratch, automations, since)
        since_us, until_us = to_us(since), to_us(until)
        leaders = insight.leaders_since(source, since_us, until_us)
        own = {insight.automation_resource_id(str(a.id)) for a in automations}
        runner = _Runner(scratch, engine, since, granularity)
        skipped = 0
        for page in events_store.rows_in_occurred_order(source, since_us, until_us, batch):
            rows = _replayable(page, engine, own, leaders)
            skipped += len(page) - len(rows)
            runner.run(rows)
        runner.finish(until)
        return Replay(
            read_firings(scratch, [str(a.id) for a in automations]), runner.replayed, skipped
        )


def _replayable(
    page: Sequence[events_store.EventRow], engine: Engine, own: set[str], leaders: set[str]
) -> list[events_store.EventRow]:
    """The rows of `page` a trigger can see (not parsed: the engine evaluates rows from
    their columns, `Engine.replay_batch`)."""
    return [
        row
        for row in page
        if row[2] not in own and (row[0] in leaders or engine.index.for_name(row[1]))
    ]


@contextlib.contextmanager
def _held_in_memory(
    engine: Engine, scratch: Connection, bucket_cache: int, seen_cache: int
) -> Iterator[None]:
    """What the replay's engine holds in memory instead of the scratch table: the
    Reactive buckets, written to the table only when the sweep reads it
    (`Engine.keep_buckets(deferred=True)`), and causal ordering's seen marks, read back
    only by an event that follows another (`Engine.keep_seen_marks`). At the end, or on
    a failure, both are dropped unwritten: after the replay only the firings are read
    (they are events), and the scratch store is thrown away."""
    engine.keep_buckets(scratch, bucket_cache, deferred=True)
    engine.keep_seen_marks(scratch, seen_cache)
    try:
        yield
    finally:
        engine.keep_seen_marks(scratch, 0)
        engine.drop_kept_buckets()


class _Runner:
    """Feeds batches to the engine and runs its proactive passes on event time."""

    def __init__(
        self, conn: Connection, engine: Engine, since: datetime, granularity: timedelta
    ) -> None:
        self.conn = conn
        self.engine = engine
        proactive = any(
            t.posture == Posture.Proactive
            for a in engine.automations.values()
            for t in a.event_triggers()
        )
        self.next_pass = since if proactive else None
        """When the next proactive pass is due (event time); None without Proactive triggers."""
        self.granularity = granularity
        """How often the daemon's sweeper would pass at most."""
        self.since = since
        self.next_sweep = since + granularity
        """The sweeper's next tick (event time)."""
        self.replayed = 0

    def run(self, rows: Sequence[events_store.EventRow]) -> None:
        """Evaluate the events stored as `rows` (in `occurred` order) in batches cut
        where a proactive pass or the sweeper's tick falls due."""
        start = 0
        due_us = self._due_us()
        for i, row in enumerate(rows):
            if row[3] >= due_us:  # the row's `occurred_us` is its event's `occurred`
                occurred = from_us(row[3])
                self._batch(rows[start:i])
                start = i
                self._passes_until(occurred)
                self._sweep_until(occurred)
                due_us = self._due_us()
        self._batch(rows[start:])

    def _due_us(self) -> int:
        """When the next proactive pass or sweeper's tick falls due, in µs (compared with
        each row's `occurred_us`, no datetime per event)."""
        due = self.next_sweep if self.next_pass is None else min(self.next_pass, self.next_sweep)
        return to_us(due)

    def _batch(self, rows: Sequence[events_store.EventRow]) -> None:
        if not rows:
            return
        now = from_us(max(row[3] for row in rows))  # the newest `occurred_us`
        with self.conn:  # the scratch store keeps only what the replay makes (firings)
            self.engine.replay_batch(self.conn, rows, now, store=False)
        self.replayed += len(rows)

    def _sweep_until(self, when: datetime) -> None:
        """The sweeper's pass at its last tick up to `when`, if one fell due: the ticks
        before it had no event between them, and each sweep deletes what an earlier one
        would have (a lost follower is evaluated at that tick, not at the first)."""
        if when < self.next_sweep:
            return
        tick = self.since + (when - self.since) // self.granularity * self.granularity
        self._periodic(tick)
        self.next_sweep = tick + self.granularity

    def _periodic(self, now: datetime) -> None:
        """What the sweeper does beside proactive passes: followers whose leader never
        came are evaluated once lost, closed buckets are swept."""
        with self.conn:
            self.engine.periodic(self.conn, now)

    def _passes_until(self, when: datetime) -> None:
        """Every pass due up to `when` (inclusive): a pass at an event's own time runs
        before the event, as the first pass of a daemon runs before its first batch."""
        while self.next_pass is not None and self.next_pass <= when:
            at = self.next_pass
            following = self.engine.proactive(self.conn, at)
            self.next_pass = max(following, at + self.granularity)

    def finish(self, until: datetime) -> None:
        """The proactive passes up to `until` and one at `until`, then the events the
        firings queued, until none are left (automations reacting to automations)."""
        self._passes_until(until)
        self._periodic(until)
        for _ in range(_INBOX_ROUNDS):
            with self.conn:
                outcome = self.engine.process_batch(self.conn, [], until)
            if not outcome.handed_off:
                break


_INBOX_ROUNDS = 1_000
"""Batches at most spent draining events the replayed firings made (each drains
`Engine.inbox_drain_limit`): automations that react to each other forever stop here."""


@attrs.frozen
class Diff:
    """Backtest firings beside the live ones, for automations loaded in both."""

    rows: list[tuple[str, Firing]]
    """("same" | "backtest only" | "live only", firing), in time order."""

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(kind for kind, _ in self.rows))


def diff(backtest: Iterable[Firing], live: Iterable[Firing]) -> Diff:
    """Match firings by identity (a multiset: a firing can repeat)."""
    live = list(live)
    remaining = collections.Counter(f.identity() for f in live)
    live_by_identity: dict[tuple[str, str, str], list[Firing]] = collections.defaultdict(list)
    for firing in live:
        live_by_identity[firing.identity()].append(firing)
    rows: list[tuple[str, Firing]] = []
    for firing in backtest:
        identity = firing.identity()
        if remaining[identity] > 0:
            remaining[identity] -= 1
            live_by_identity[identity].pop()
            rows.append(("same", firing))
        else:
            rows.append(("backtest only", firing))
    rows += [("live only", f) for fs in live_by_identity.values() for f in fs]
    rows.sort(key=lambda row: (row[1], row[0]))
    return Diff(rows)


def live_firings(
    source: apsw.Connection, automation_ids: Sequence[str], since: datetime, until: datetime
) -> list[Firing]:
    """The firings the loaded automations really made whose event time is in the window."""
    return [f for f in read_firings(source, automation_ids) if since <= f.fired < until]


def loaded_ids(source: apsw.Connection, automations: Sequence[Automation]) -> list[str]:
    """The automations of the file that the live database has loaded (same id)."""
    return [str(a.id) for a in automations if insight.automation_definition(source, str(a.id))]
