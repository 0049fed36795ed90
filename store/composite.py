"""The latest firing of each direct child of a composite trigger
(docs/TRIGGERS.md#composite-triggers).

Functions of a connection, called inside the caller's transaction. One row per
(automation, parent trigger, child trigger): a new firing of a child replaces the previous
one. ``child_fired_us`` is the firing's *event* time
(docs/TRIGGERS.md#where-trigd-differs-from-prefect), so expiry and sequence order judge a replayed
backlog as it happened, not as it was processed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apsw

from store.db import in_chunks


class ChildFiringRow(NamedTuple):
    automation_id: str
    parent_trigger_id: str
    child_trigger_id: str
    child_firing_id: str
    child_fired_us: int  # event time of the child firing, µs since the epoch
    child_firing: str  # Firing JSON


def upsert_child_firing(conn: apsw.Connection, row: ChildFiringRow) -> bool:
    """Store a child's firing, replacing that child's previous one unless the stored one
    is newer in event time (a late, older firing must not displace it). Returns whether
    this firing is now the child's row."""
    conn.execute(
        "INSERT INTO composite_child_firings (automation_id, parent_trigger_id, "
        "child_trigger_id, child_firing_id, child_fired_us, child_firing) "
        "VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (automation_id, parent_trigger_id, child_trigger_id) DO UPDATE SET "
        "child_firing_id = excluded.child_firing_id, "
        "child_fired_us = excluded.child_fired_us, "
        "child_firing = excluded.child_firing "
        "WHERE excluded.child_fired_us >= composite_child_firings.child_fired_us",
        row,
    )
    return conn.changes() == 1


def read_child_firings(
    conn: apsw.Connection,
    automation_id: str,
    parent_trigger_id: str,
    child_trigger_ids: Sequence[str],
) -> list[ChildFiringRow]:
    """The stored firings of the given (direct) children of one parent."""
    if not child_trigger_ids:
        return []
    marks = ",".join("?" * len(child_trigger_ids))
    cursor = conn.execute(
        "SELECT automation_id, parent_trigger_id, child_trigger_id, child_firing_id, "
        "child_fired_us, child_firing FROM composite_child_firings "
        f"WHERE automation_id = ? AND parent_trigger_id = ? AND child_trigger_id IN ({marks}) "
        "ORDER BY child_fired_us, child_trigger_id",
        (automation_id, parent_trigger_id, *child_trigger_ids),
    )
    return [
        ChildFiringRow(str(a), str(p), str(c), str(f), int(t), str(j))
        for a, p, c, f, t, j in cursor
    ]


def expire_child_firings(
    conn: apsw.Connection, automation_id: str, parent_trigger_id: str, fired_before_us: int
) -> int:
    """Forget firings whose event time is before the cutoff; returns how many."""
    conn.execute(
        "DELETE FROM composite_child_firings WHERE automation_id = ? "
        "AND parent_trigger_id = ? AND child_fired_us < ?",
        (automation_id, parent_trigger_id, fired_before_us),
    )
    return conn.changes()


def take_child_firings(
    conn: apsw.Connection,
    automation_id: str,
    parent_trigger_id: str,
    child_firing_ids: Iterable[str],
) -> set[str]:
    """Delete exactly these firings of one parent; returns the ids actually deleted, so a
    caller can tell whether it consumed the whole set it read."""
    ids = list(child_firing_ids)
    taken: set[str] = set()
    for chunk, marks in in_chunks(ids):
        taken.update(
            str(row[0])
            for row in conn.execute(
                "DELETE FROM composite_child_firings WHERE automation_id = ? "
                f"AND parent_trigger_id = ? AND child_firing_id IN ({marks}) "
                "RETURNING child_firing_id",
                (automation_id, parent_trigger_id, *chunk),
            )
        )
    return taken


def forget_triggers(conn: apsw.Connection, trigger_ids: Iterable[str]) -> int:
    """Drop every stored firing where one of these triggers is the parent or the child
    (a changed trigger starts fresh; a disabled automation keeps nothing); returns how
    many rows went."""
    ids = list(trigger_ids)
    removed = 0
    for chunk, marks in in_chunks(ids):
        conn.execute(
            "DELETE FROM composite_child_firings "
            f"WHERE parent_trigger_id IN ({marks}) OR child_trigger_id IN ({marks})",
            (*chunk, *chunk),
        )
        removed += conn.changes()
    return removed


def count_child_firings(conn: apsw.Connection, automation_id: str | None = None) -> int:
    """How many child firings are waiting (for status and tests)."""
    if automation_id is None:
        row = conn.execute("SELECT count(*) FROM composite_child_firings").fetchone()
    else:
        row = conn.execute(
            "SELECT count(*) FROM composite_child_firings WHERE automation_id = ?",
            (automation_id,),
        ).fetchone()
    return 0 if row is None else int(row[0])
