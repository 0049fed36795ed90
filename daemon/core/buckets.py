"""The bucket arithmetic of an EventTrigger (docs/TRIGGERS.md#bucket-lifecycle), as pure values.

Theory of operation: a bucket is one counting window `[start, end)` of one trigger for one
bucketing key, in event time. `evaluate` is Prefect's `evaluate()` without a database: it
takes the bucket as it is stored, the evaluation time (`occurred` for reactive, `as_of`
for proactive) and the triggering event, and returns

* `stored`: what the row must look like afterwards (None: the row is deleted),
* `returned`: what Prefect's function returns (the proactive scheduler reads its `end`),
* `fires`: the firings it decided on, in order, as labels + triggering event.

The two differ on one path Prefect has: a trigger with `within == 0` and no `after` that
fires or whose window is over returns None but leaves its row in place (only the sweep
removes it). `store/buckets.py` persists `stored`; `daemon/engine/engine.py` turns `fires` into
`Firing`s with the wall clock, since nothing here may read a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final, NamedTuple

import attrs

from daemon.core.automations import EventTrigger
from daemon.core.events import EvaluatedEvent, ReceivedEvent

_ZERO: Final = timedelta(0)


@attrs.define(slots=True, eq=False)
class EventRef:
    """An event as a model, as JSON, or both: each form is made only when needed, because
    most buckets are read and written without anyone looking inside `last_event`."""

    _model: ReceivedEvent | None = None
    _json: str | None = None

    @classmethod
    def of(cls, event: ReceivedEvent, json: str | None = None) -> EventRef:
        return cls(event, json)

    @classmethod
    def from_json(cls, json: str) -> EventRef:
        return cls(None, json)

    def model(self) -> ReceivedEvent:
        if self._model is None:
            assert self._json is not None
            self._model = ReceivedEvent.model_validate_json(self._json)
        return self._model

    def json(self) -> str:
        if self._json is None:
            assert self._model is not None
            self._json = self._model.model_dump_json()
        return self._json


@attrs.frozen(slots=True)
class Bucket:
    """One row of the `buckets` table, in event time."""

    key: tuple[str, ...]
    start: datetime
    end: datetime
    count: int
    last_event: EventRef | None = None
    last_operation: str = ""


@attrs.frozen(slots=True)
class Fire:
    """A decision to fire: Prefect's Firing minus what needs the wall clock."""

    triggering_labels: dict[str, str]
    triggering_event: ReceivedEvent | None
    event_time: datetime
    """When it fired in event time: the triggering event's `occurred`, else the `now` of
    the evaluation (the proactive `as_of`). Composite `within` uses it
    (docs/TRIGGERS.md#where-trigd-differs-from-prefect)."""


class Evaluation(NamedTuple):
    """What `evaluate` decided (a tuple: one per evaluation, and cheaper to build)."""

    stored: Bucket | None
    returned: Bucket | None
    fires: Sequence[Fire]


def ensure(
    existing: Bucket | None,
    key: tuple[str, ...],
    start: datetime,
    end: datetime,
    last_event: EventRef | None,
    initial_count: int = 0,
) -> Bucket:
    """`ensure_bucket` (docs/TRIGGERS.md#reactive-evaluation, steps 1-2): a new bucket if there is
    none, else the existing one with only `last_event` replaced (and only when one is given)."""
    if existing is None:
        return Bucket(key, start, end, initial_count, last_event, "ensure_bucket[insert]")
    if last_event is None:
        return existing
    e = existing
    return Bucket(e.key, e.start, e.end, e.count, last_event, e.last_operation)


def evaluate(
    trigger: EventTrigger,
    bucket: Bucket,
    now: datetime,
    triggering_event: EvaluatedEvent | None,
    triggering_ref: EventRef | None = None,
) -> Evaluation:
    """Count `triggering_event` into `bucket` at event time `now` and decide on firing.

    `triggering_ref` is the same event as an `EventRef` (to reuse its JSON); it is made
    from `triggering_event` when not given. The event's model is asked for only when it
    fires (a stored event is parsed then, `StoredEvent`).
    """
    if triggering_event is not None and triggering_ref is None:
        triggering_ref = EventRef.of(triggering_event.parsed())
    fires: list[Fire] = []
    stored, returned = _evaluate(trigger, bucket, now, triggering_event, triggering_ref, fires)
    return Evaluation(stored, returned, fires)


def _evaluate(
    trigger: EventTrigger,
    bucket: Bucket,
    now: datetime,
    event: EvaluatedEvent | None,
    ref: EventRef | None,
    fires: list[Fire],
) -> tuple[Bucket | None, Bucket | None]:
    count = 1 if event is not None else 0

    if now < bucket.start:
        return bucket, bucket  # late or redundant: ignored entirely

    if count and (trigger.immediate or bucket.start <= now < bucket.end):
        bucket = Bucket(
            bucket.key, bucket.start, bucket.end, bucket.count + 1, ref, "increment_bucket"
        )
        count = 0

    reactive = trigger.reactive
    ready = reactive or bucket.end <= now
    meets = trigger.meets_threshold(bucket.count)

    if ready and meets:
        last = bucket.last_event
        fired_by = (
            event.parsed() if event is not None else (last.model() if last is not None else None)
        )
        fires.append(
            Fire(
                trigger.triggering_labels(bucket.key),
                fired_by,
                fired_by.occurred if fired_by is not None else now,
            )
        )
        stored: Bucket | None = None  # remove_bucket
    elif now < bucket.end:
        if (
            event is not None
            and not reactive
            and not meets
            and trigger.starts_after(event.event)
            and trigger.expects(event.event)
        ):
            # a repeated arming event restarts a proactive window (heartbeats)
            fresh = Bucket(
                bucket.key,
                event.occurred,
                event.occurred + trigger.within,
                0,
                ref,
                "start_new_bucket",
            )
            return fresh, fresh
        return bucket, bucket
    else:
        stored = bucket  # window over without firing: the row stays for now

    if trigger.after:
        return None, None  # re-armed only by a new `after` event
    if trigger.within == _ZERO:
        return stored, None  # Prefect leaves this row to the sweep

    start = max(bucket.end, now)
    end = start + trigger.within
    if reactive and count > 0:
        # an unspent event after the window: count it in the next one
        fresh = Bucket(bucket.key, start, end, 0, None, "start_new_bucket")
        return _evaluate(trigger, fresh, now, event, ref, fires)
    fresh = Bucket(bucket.key, start, end, count, None, "start_new_bucket")
    return fresh, fresh
