"""`trigd explain` (docs/INSIGHT.md): why an automation did or did not fire, as one
JSON-able document built from what the store holds.

Read-only: every read is a plain SELECT, so it runs on a read-only connection beside a
serving daemon (`trigd explain`, and the HTTP route that serves the same document). The
judgements are `daemon/core/explanation.py`'s; `now` is the wall clock, turned into event
time with the stored events clock, as the engine itself would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import apsw
import attrs
from pydantic import ValidationError
from pydantic_core import from_json

from daemon.core.automations import (
    CompoundTrigger,
    EventTrigger,
    SequenceTrigger,
    TriggerTypes,
    parse_trigger,
)
from daemon.core.buckets import Bucket, EventRef
from daemon.core.clock import META_KEY, EventsClock, from_us
from daemon.core.events import ReceivedEvent
from daemon.core.explanation import (
    Verdict,
    describe_composite,
    describe_event_trigger,
    iso,
    judge_bucket,
    judge_event,
)
from store import insight
from store.composite import ChildFiringRow
from store.events import read_meta

ORDERING_SCOPE: Final = "triggers"
"""The engine's causal-ordering scope (daemon/engine/engine.py), whose parked followers
may be waiting to reach a trigger."""


class UnknownAutomation(LookupError):
    """No loaded automation has this id or name."""


class UnreadableAutomation(UnknownAutomation):
    """The automation is loaded but its stored definition does not parse."""


@attrs.frozen
class Limits:
    """How much one explanation reads and lists ([insight] in the configuration)."""

    recent_events: int = 1_000
    """Stored events scanned, newest first, for matches and near misses."""
    listed: int = 10
    """Entries per list: buckets, firings, matched events, near misses, parked followers."""


def explain(
    conn: apsw.Connection,
    id_or_name: str,
    now: datetime,
    *,
    key: tuple[str, ...] | None = None,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """The explanation of one loaded automation (by id, else by name) at wall time `now`,
    restricted to one bucketing key when `key` is given. Raises UnknownAutomation."""
    found = insight.find_automation(conn, id_or_name)
    if found is None:
        raise UnknownAutomation(f"no loaded automation has the id or name {id_or_name!r}")
    automation_id, name, enabled, definition = found
    try:
        document = from_json(definition)
        trigger = parse_trigger(document["trigger"])
    except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
        raise UnreadableAutomation(
            f"automation {name!r}: its stored definition does not parse ({type(exc).__name__}); "
            "reload the daemon with this trigd to store it again"
        ) from None
    clock = EventsClock.from_json(read_meta(conn, META_KEY))
    as_of = clock.as_of(now)
    recent = [_event(row.data) for row in insight.recent_events(conn, limits.recent_events)]
    parked = [
        (row.leader_id, event)
        for row in insight.parked_followers(conn, ORDERING_SCOPE, limits.recent_events)
        if (event := _event(row.event)) is not None
    ]
    context = _Context(
        conn,
        automation_id,
        enabled,
        as_of,
        key,
        limits,
        [e for e in recent if e is not None],
        parked,
        insight.child_firings(conn, automation_id),
    )
    return {
        "automation": {"id": automation_id, "name": name, "enabled": enabled},
        "now": iso(now),
        "as_of": iso(as_of),
        "events_clock": iso(clock.clock),
        "key": None if key is None else list(key),
        "trigger": context.node(trigger, "trigger"),
        "firings": _firings(conn, automation_id, limits.listed),
        "events_scanned": len(recent),
    }


def _event(data: str) -> ReceivedEvent | None:
    try:
        return ReceivedEvent.model_validate_json(data)
    except ValidationError:
        return None  # an event stored by an older trigd that no longer parses: not shown


def _summary(event: ReceivedEvent | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {
        "id": str(event.id),
        "event": event.event,
        "occurred": iso(event.occurred),
        "resource": event.resource.id,
    }


@attrs.define
class _Context:
    conn: apsw.Connection
    automation_id: str
    enabled: bool
    as_of: datetime
    key: tuple[str, ...] | None
    limits: Limits
    recent: list[ReceivedEvent]
    parked: list[tuple[str, ReceivedEvent]]
    child_rows: list[ChildFiringRow]

    def node(self, trigger: TriggerTypes, path: str) -> dict[str, Any]:
        if isinstance(trigger, EventTrigger):
            return self.event_node(trigger, path)
        return self.composite_node(trigger, path)

    def event_node(self, trigger: EventTrigger, path: str) -> dict[str, Any]:
        listed = self.limits.listed
        key_json = None if self.key is None else insight_key(self.key)
        rows = insight.trigger_buckets(self.conn, [str(trigger.id)], listed, key_json)
        buckets = [_bucket(row) for row in rows]
        views = [judge_bucket(trigger, b, self.as_of) for b in buckets]
        by_key = {b.key: b for b in buckets}
        matched: list[dict[str, Any]] = []
        near: list[dict[str, Any]] = []
        for event in self.recent:
            judged = judge_event(trigger, event, by_key)
            if judged is None or (self.key is not None and judged.key != self.key):
                continue
            target = matched if judged.verdict is Verdict.matched else near
            if len(target) < listed:
                target.append({**(_summary(event) or {}), "why": judged.why})
        parked = [
            {**(_summary(event) or {}), "waits_for": leader}
            for leader, event in self.parked
            if trigger.covers(event)
            and (self.key is None or trigger.bucketing_key(event) == self.key)
        ][:listed]
        can_fire, why = self.verdict(trigger, buckets, [v.can_fire for v in views])
        why += [f"{_key_text(b.key)}: {v.why}" for b, v in zip(buckets, views, strict=True)]
        if parked:
            why.append(
                f"{len(parked)} matching event(s) are held by causal ordering until the "
                "event they follow arrives (or they are given up as lost)"
            )
        return {
            "id": str(trigger.id),
            "path": path,
            "type": "event",
            "posture": trigger.posture.value,
            "settings": describe_event_trigger(trigger),
            "threshold": trigger.threshold,
            "within_seconds": trigger.within.total_seconds(),
            "can_fire": can_fire,
            "why": why,
            "open_buckets": insight.count_buckets(self.conn, str(trigger.id)),
            "buckets": [
                {
                    "key": list(b.key),
                    "labels": trigger.triggering_labels(b.key),
                    "start": iso(b.start),
                    "end": iso(b.end),
                    "count": max(b.count, 0),
                    "threshold": trigger.threshold,
                    "after_seen": True if trigger.after else None,
                    "state": v.state,
                    "can_fire": v.can_fire,
                    "why": v.why,
                    "last_event": _summary(b.last_event.model() if b.last_event else None),
                }
                for b, v in zip(buckets, views, strict=True)
            ],
            "matched": matched,
            "near_misses": near,
            "parked": parked,
        }

    def verdict(
        self, trigger: EventTrigger, buckets: Sequence[Bucket], bucket_fire: Sequence[bool]
    ) -> tuple[bool, list[str]]:
        """Whether the trigger can fire (on the next matching event, or at a window's end
        for a Proactive one), and the reasons that are not about one bucket."""
        why: list[str] = []
        if not self.enabled:
            return False, ["the automation is disabled: its triggers see no events"]
        if trigger.after and not buckets:
            where = "" if self.key is None else f" for key {_key_text(self.key)}"
            return False, [
                f"no `after` event ({' or '.join(sorted(trigger.after))}) seen yet{where}: "
                "counting starts only after one"
            ]
        if not buckets:
            if trigger.reactive:
                fires = trigger.threshold <= 1
                if fires and trigger.immediate:
                    why.append("every matching event fires it")
                else:
                    why.append(
                        "no open window: the next matching event opens one"
                        + (" and fires it" if fires else "")
                    )
                return fires, why
            why.append("no window yet: the next proactive pass opens one")
            return True, why
        return any(bucket_fire), why

    def composite_node(
        self, trigger: CompoundTrigger | SequenceTrigger, path: str
    ) -> dict[str, Any]:
        children = [
            self.node(child, f"{path}.triggers[{i}]") for i, child in enumerate(trigger.triggers)
        ]
        paths = {str(child.id): f"{path}.triggers[{i}]" for i, child in enumerate(trigger.triggers)}
        rows = [r for r in self.child_rows if r.parent_trigger_id == str(trigger.id)]
        fired: list[dict[str, Any]] = []
        for row in rows:
            document = from_json(row.child_firing)
            event = document.get("triggering_event") if isinstance(document, dict) else None
            fired.append(
                {
                    "trigger": row.child_trigger_id,
                    "path": paths.get(row.child_trigger_id),
                    "at": iso(from_us(row.child_fired_us)),
                    "triggering_event": _brief(event),
                }
            )
        need = trigger.num_expected_firings
        have = {r.child_trigger_id for r in rows}
        waiting = [paths[str(c.id)] for c in trigger.triggers if str(c.id) not in have]
        why = [f"{len(have)} of {need} child firings needed are stored"]
        if isinstance(trigger, SequenceTrigger) and waiting:
            why.append(f"next in the sequence: {waiting[0]}")
        elif waiting:
            why.append(f"not fired yet: {', '.join(waiting)}")
        if trigger.within is not None:
            old = [r for r in rows if from_us(r.child_fired_us) < self.as_of - trigger.within]
            if old:
                why.append(
                    f"{len(old)} stored child firing(s) are older than within and will not count"
                )
        missing = need - len(have)
        can_fire = (
            self.enabled
            and any(child["can_fire"] for child in children if child["id"] not in have)
            and missing <= 1
        )
        return {
            "id": str(trigger.id),
            "path": path,
            "type": trigger.type,
            "settings": describe_composite(trigger),
            "can_fire": can_fire,
            "why": why,
            "fired_children": fired,
            "children": children,
        }


def insight_key(key: tuple[str, ...]) -> str:
    """A bucketing key as the store keeps it."""
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))


def _key_text(key: tuple[str, ...]) -> str:
    return "(all)" if not key else json.dumps(list(key), ensure_ascii=False)


def _bucket(row: insight.BucketRow) -> Bucket:
    return Bucket(
        tuple(from_json(row.bucketing_key)),
        from_us(row.start_us),
        from_us(row.end_us),
        row.counted,
        None if row.last_event is None else EventRef.from_json(row.last_event),
    )


def _firings(conn: apsw.Connection, automation_id: str, limit: int) -> list[dict[str, Any]]:
    """The automation's last firings, newest first, from its `prefect.automation.triggered`
    events (every firing makes one, whether or not it has actions)."""
    firings = []
    for data in insight.firing_events(conn, automation_id, limit):
        event = _event(data)
        if event is None:
            continue
        payload = event.payload
        triggering = payload.get("triggering_event")
        brief = _brief(triggering)
        if brief is not None and isinstance(triggering, dict):
            brief["resource"] = (triggering.get("resource") or {}).get("prefect.resource.id")
        firings.append(
            {
                "fired": iso(event.occurred),
                "labels": payload.get("triggering_labels") or {},
                "triggering_event": brief,
            }
        )
    return firings


def _brief(event: object) -> dict[str, Any] | None:
    """A firing's triggering event, as stored in its document, in a few words: its id,
    name and time (None when the firing had none)."""
    if not isinstance(event, dict):
        return None
    return {"id": event.get("id"), "event": event.get("event"), "occurred": event.get("occurred")}
