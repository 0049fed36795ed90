"""Composite triggers: compound and sequence (docs/TRIGGERS.md#composite-triggers), judged in event
time.

Theory of operation. When a child of a composite fires, the engine calls
`evaluate_composite_trigger` inside the transaction that made the child's firing. With one
expected firing the parent fires at once and nothing is stored. Otherwise the child's
firing is stored as the parent's row for that child (store/composite.py), and the parent
fires when the stored rows of its direct children are ready; those rows are consumed.

Where trigd differs from Prefect (docs/TRIGGERS.md#where-trigd-differs-from-prefect): a child firing
counts at its *event time* (its triggering event's `occurred`, or the proactive `as_of`), given by
the caller as `event_time`, not at its wall-clock `triggered`. So:

* `within` expires rows whose event time is before `event_time - within`, and the firings
  that make the parent fire must all lie within one `within` of each other in event time
  (with in-order arrivals this is exactly Prefect's rule; it matters when a late event
  arrives with an `occurred` older than rows already stored);
* a sequence orders its children by event time; equal event times are ordered by the
  children's declaration order, so two children that fire from one event count as "in
  order" (scenario 81 therefore fires once in trigd, deterministically);
* a child's stored row is replaced only by a firing that is not older in event time, so a
  late-arriving old firing cannot displace a newer one (it is then "not among" the rows and
  the evaluation returns, like Prefect's superseded firing).

`Firing.triggered` stays the wall clock (`now`), as in Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from uuid import UUID

import apsw

from daemon.core.automations import Automation, CompoundTrigger, SequenceTrigger
from daemon.core.clock import span_us, to_us
from daemon.core.firings import Firing, TriggerState
from store import composite as composite_store
from store.composite import ChildFiringRow

logger = logging.getLogger(__name__)

CompositeParent = CompoundTrigger | SequenceTrigger


def evaluate_composite_trigger(
    conn: apsw.Connection,
    firing: Firing,
    parent: CompositeParent,
    automation: Automation,
    event_time: datetime,
    now: datetime,
) -> Firing | None:
    """Record that `firing` (of a direct child of `parent`) happened at `event_time`;
    return the parent's firing if the parent fires now, else None. Runs inside the
    caller's transaction; the parent's firing has the same event time."""
    children = parent.child_trigger_ids
    if firing.trigger.id not in children:
        raise ValueError(
            f"trigger {firing.trigger.id} is not a direct child of composite trigger "
            f"{parent.id} of automation {automation.id}"
        )
    if parent.num_expected_firings == 1:
        _log_fired(automation, parent, [firing], shortcut=True)
        return _parent_firing(parent, [firing], firing, now)

    automation_id, parent_id = str(automation.id), str(parent.id)
    event_us = to_us(event_time)
    within_us = None if parent.within is None else span_us(parent.within)
    if within_us is not None:
        composite_store.expire_child_firings(conn, automation_id, parent_id, event_us - within_us)
    composite_store.upsert_child_firing(
        conn,
        ChildFiringRow(
            automation_id=automation_id,
            parent_trigger_id=parent_id,
            child_trigger_id=str(firing.trigger.id),
            child_firing_id=str(firing.id),
            child_fired_us=event_us,
            child_firing=firing.model_dump_json(),
        ),
    )
    rows = composite_store.read_child_firings(
        conn, automation_id, parent_id, [str(child) for child in children]
    )
    if str(firing.id) not in {row.child_firing_id for row in rows}:
        return None  # superseded: a newer firing of this child holds its row

    used = ready_rows(parent, rows, event_us, within_us)
    if used is None:
        return None
    wanted = {row.child_firing_id for row in used}
    if composite_store.take_child_firings(conn, automation_id, parent_id, wanted) != wanted:
        return None  # another evaluation consumed some of them first
    firings = [Firing.model_validate_json(row.child_firing) for row in used]
    _log_fired(automation, parent, firings, shortcut=False)
    return _parent_firing(parent, firings, firing, now)


def ready_rows(
    parent: CompositeParent,
    rows: Sequence[ChildFiringRow],
    event_us: int,
    within_us: int | None,
) -> list[ChildFiringRow] | None:
    """The stored rows that make `parent` fire now, in (event time, declaration) order,
    or None when it does not. `event_us` is the current child firing's event time: the
    rows used always include a window of width `within` that contains it."""
    position = {str(child): index for index, child in enumerate(parent.child_trigger_ids)}
    ordered = sorted(rows, key=lambda r: (r.child_fired_us, position[r.child_trigger_id]))
    if isinstance(parent, SequenceTrigger):
        if [r.child_trigger_id for r in ordered] != list(position):
            return None
        span_us = ordered[-1].child_fired_us - ordered[0].child_fired_us
        return None if within_us is not None and span_us > within_us else ordered
    needed = parent.num_expected_firings
    if within_us is None:
        return ordered if len(ordered) >= needed else None
    # The earliest window [start, start + within] holding the current firing and enough
    # rows; with in-order arrivals that is every stored row, as in Prefect. Rows before
    # event_us - within are expired already, so every start <= event_us reaches it.
    for start in sorted({r.child_fired_us for r in ordered if r.child_fired_us <= event_us}):
        window = [r for r in ordered if start <= r.child_fired_us <= start + within_us]
        if len(window) >= needed:
            return window
    return None


def forget_trigger_state(conn: apsw.Connection, trigger_ids: Iterable[UUID]) -> int:
    """Drop stored child firings of these triggers, as parents or as children: for a
    trigger that changed (it starts fresh) or an automation that was disabled or removed.
    Returns how many rows went."""
    return composite_store.forget_triggers(conn, (str(t) for t in trigger_ids))


def _parent_firing(
    parent: CompositeParent, firings: list[Firing], current: Firing, now: datetime
) -> Firing:
    return Firing(
        trigger=parent,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=now,
        triggering_labels={},
        triggering_firings=firings,
        triggering_event=current.triggering_event,
    )


def _log_fired(
    automation: Automation, parent: CompositeParent, firings: Sequence[Firing], *, shortcut: bool
) -> None:
    logger.info(
        "Automation %s (%r) %s trigger %s fired%s on firings %s",
        automation.id,
        automation.name,
        parent.type,
        parent.id,
        " (shortcut)" if shortcut else "",
        ",".join(str(f.id) for f in firings),
    )
