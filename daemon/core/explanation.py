"""Why a trigger did or did not fire (docs/INSIGHT.md), as pure judgements of values: a
trigger's settings in words, what one bucket means at an event time, and whether a stored
event counted, nearly counted, or came too late.

`daemon/engine/explain.py` reads the rows and assembles the document; nothing here reads
a clock: the event time to judge at (`as_of`) is an argument.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from daemon.core.automations import CompoundTrigger, EventTrigger, SequenceTrigger
from daemon.core.buckets import Bucket
from daemon.core.durations import format_duration
from daemon.core.events import Event


def iso(value: datetime | None) -> str | None:
    """A time as the documents show it: ISO 8601 in UTC with a Z."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _names(patterns: frozenset[str]) -> str:
    return " or ".join(sorted(patterns))


def _spec(field: str, spec: Mapping[str, Any]) -> str:
    return f"{field} {json.dumps(dict(spec), sort_keys=True)}"


def describe_event_trigger(trigger: EventTrigger) -> str:
    """ "fires when 3 or more pump.pressure.high arrive within 1m, per prefect.resource.id"."""
    what = _names(trigger.expect) if trigger.expect else "events of any name"
    within = format_duration(trigger.within)
    if trigger.reactive:
        if trigger.threshold <= 1 and trigger.within == timedelta(0):
            text = f"fires on every {what}"
        elif trigger.within == timedelta(0):
            text = f"fires when {trigger.threshold} or more {what} have arrived (no time limit)"
        else:
            text = f"fires when {trigger.threshold} or more {what} arrive within {within}"
    else:
        text = f"fires when fewer than {trigger.threshold} {what} arrive within {within}"
    if trigger.after:
        text += f", counting from each {_names(trigger.after)}"
    if trigger.for_each:
        text += f", per {', '.join(trigger.sorted_for_each)}"
    conditions = []
    if len(trigger.match.root):
        conditions.append(_spec("match", trigger.match.root))
    related = trigger.match_related
    for spec in related if isinstance(related, list) else [related]:
        if len(spec.root):
            conditions.append(_spec("match_related", spec.root))
    if conditions:
        text += "; only events with " + " and ".join(conditions)
    return text


def describe_composite(trigger: CompoundTrigger | SequenceTrigger) -> str:
    within = "" if trigger.within is None else f" within {format_duration(trigger.within)}"
    count = len(trigger.triggers)
    if isinstance(trigger, SequenceTrigger):
        return f"fires when its {count} triggers fire in the order written{within}"
    need = trigger.num_expected_firings
    return f"fires when {need} of its {count} triggers have fired{within}"


class BucketView(NamedTuple):
    """One bucket judged at an event time."""

    state: str
    """"open", "ended" (its window is over) or "future" (it opens later)."""
    can_fire: bool
    why: str


def judge_bucket(trigger: EventTrigger, bucket: Bucket, as_of: datetime) -> BucketView:
    """What `bucket` means at event time `as_of`: can it still fire, and if not, why."""
    count, threshold = max(bucket.count, 0), trigger.threshold
    end, start = iso(bucket.end), iso(bucket.start)
    if as_of < bucket.start:
        return BucketView("future", False, f"its window opens at {start}")
    state = "open" if as_of < bucket.end or trigger.immediate else "ended"
    if trigger.reactive:
        if state == "open":
            missing = max(threshold - count, 1)
            until = "" if trigger.immediate else f" before {end}"
            more = "1 more matching event" if missing == 1 else f"{missing} more matching events"
            verb = "fires" if missing == 1 else "fire"
            return BucketView(
                state, missing == 1, f"{count} of {threshold} counted: {more}{until} {verb} it"
            )
        again = (
            "a new `after` event starts a new window"
            if trigger.after
            else "the next matching event starts a new window"
        )
        return BucketView(
            state, False, f"its window ended at {end} with {count} of {threshold}; {again}"
        )
    if count >= threshold:
        return BucketView(
            state,
            False,
            f"{count} arrived (threshold {threshold}): this window (until {end}) will not fire",
        )
    if state == "open":
        return BucketView(
            state, True, f"fires at {end} unless {threshold - count} more matching arrive"
        )
    return BucketView(state, True, f"{count} of {threshold} at {end}: fires at the next pass")


class Verdict(StrEnum):
    matched = "matched"
    near_miss = "near miss"


class Judgement(NamedTuple):
    verdict: Verdict
    why: str
    key: tuple[str, ...]


def judge_event(
    trigger: EventTrigger,
    event: Event,
    buckets: Mapping[tuple[str, ...], Bucket],
) -> Judgement | None:
    """Whether `event` counted for `trigger` (matched), nearly did (its name fitted but not
    its resources, the reverse, or it occurred before the window open for its key), or was
    unrelated (None). `buckets` are the trigger's open buckets by key."""
    name = event.event
    expected = trigger.expects(name) if trigger.expect else True
    arming = bool(trigger.after) and trigger.starts_after(name)
    name_fits = expected or arming
    resources_fit = trigger.covers_resources(event)
    key = trigger.bucketing_key(event) if resources_fit else ()
    if name_fits and resources_fit:
        bucket = buckets.get(key)
        if bucket is not None and event.occurred < bucket.start and expected:
            return Judgement(
                Verdict.near_miss,
                f"arrived after its window: it occurred at {iso(event.occurred)}, before "
                f"the window open for its key began ({iso(bucket.start)}), so it was not counted",
                key,
            )
        role = "an `after` event" if arming and not expected else "an expected event"
        return Judgement(Verdict.matched, role, key)
    if name_fits:
        return Judgement(
            Verdict.near_miss, "its name is expected but its resource did not match", key
        )
    filtered = len(trigger.match.root) or _has_related(trigger)
    if resources_fit and trigger.expect and filtered:
        wanted = _names(trigger.expect | trigger.after)
        return Judgement(
            Verdict.near_miss, f"its resource matched but its name is not {wanted}", key
        )
    return None


def _has_related(trigger: EventTrigger) -> bool:
    related = trigger.match_related
    return any(len(spec.root) for spec in (related if isinstance(related, list) else [related]))


def parse_key(text: str, name: str = "--key") -> tuple[str, ...]:
    """`--key` (or the HTTP route's `key`: `name`): the bucketing key, as a JSON array of
    the `for_each` values (in the order of their sorted labels), or a bare value for a
    trigger with one `for_each` label. ValueError says which form is wanted."""
    if not text.startswith("["):
        return (text,)
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(
            f"{name}: {text!r} is not a JSON array of strings; give one value, or the "
            'values of every for_each label as ["a", "b"] in the order of the sorted labels'
        )
    return tuple(values)
