"""Reads for `trigd explain` and `trigd backtest` (docs/INSIGHT.md): what the store holds
about one automation, and the stored events in `occurred` order.

Read-only functions of a connection (the callers open the database read-only, so they are
safe while the daemon serves); every read is bounded by a `limit` or pages by keyset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

import apsw

from store.composite import ChildFiringRow
from store.db import in_chunks
from store.ordering import FollowerRow

TRIGGERED_EVENT: Final = "prefect.automation.triggered"
"""The state-change event every firing of an automation makes (and only a firing)."""


def automation_resource_id(automation_id: str) -> str:
    """The resource of the events trigd makes about an automation."""
    return f"prefect.automation.{automation_id}"


class BucketRow(NamedTuple):
    trigger_id: str
    bucketing_key: str  # JSON array of strings
    start_us: int
    end_us: int
    counted: int
    last_event: str | None  # ReceivedEvent JSON


class StoredEvent(NamedTuple):
    id: str
    event: str
    resource_id: str
    occurred_us: int
    received_us: int
    data: str  # ReceivedEvent JSON


def find_automation(conn: apsw.Connection, id_or_name: str) -> tuple[str, str, bool, str] | None:
    """(id, name, enabled, definition JSON) of the loaded automation with this id or name
    (the id is tried first); None when none is loaded under either."""
    for column in ("id", "name"):
        row = conn.execute(
            f"SELECT id, name, enabled, definition FROM automations WHERE {column} = ?",
            (id_or_name,),
        ).fetchone()
        if row is not None:
            return str(row[0]), str(row[1]), bool(row[2]), str(row[3])
    return None


def automation_definition(conn: apsw.Connection, automation_id: str) -> str | None:
    row = conn.execute(
        "SELECT definition FROM automations WHERE id = ?", (automation_id,)
    ).fetchone()
    return None if row is None else str(row[0])


def trigger_buckets(
    conn: apsw.Connection, trigger_ids: Sequence[str], limit: int, key: str | None = None
) -> list[BucketRow]:
    """The buckets of these triggers (of one bucketing key, when given), oldest window first,
    at most `limit` per trigger."""
    rows: list[BucketRow] = []
    for trigger_id in trigger_ids:
        sql = (
            "SELECT trigger_id, bucketing_key, start_us, end_us, count, last_event "
            "FROM buckets WHERE trigger_id = ?"
        )
        args: tuple[object, ...] = (trigger_id,)
        if key is not None:
            sql += " AND bucketing_key = ?"
            args += (key,)
        sql += " ORDER BY start_us, bucketing_key LIMIT ?"
        rows.extend(BucketRow(*row) for row in conn.execute(sql, (*args, limit)))
    return rows


def count_buckets(conn: apsw.Connection, trigger_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM buckets WHERE trigger_id = ?", (trigger_id,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def recent_events(conn: apsw.Connection, limit: int) -> list[StoredEvent]:
    """The `limit` events received last, newest first."""
    return [
        StoredEvent(*row)
        for row in conn.execute(
            "SELECT id, event, resource_id, occurred_us, received_us, data FROM events "
            "ORDER BY received_us DESC, rowid DESC LIMIT ?",
            (limit,),
        )
    ]


def firing_events(conn: apsw.Connection, automation_id: str, limit: int) -> list[str]:
    """The `prefect.automation.triggered` events of one automation (ReceivedEvent JSON),
    newest first: those still in the inbox, then the stored ones; at most `limit`."""
    resource = automation_resource_id(automation_id)
    # the inbox holds a handful of rows between two batches: scanned whole, filtered here
    queued = [
        str(data)
        for (data,) in conn.execute("SELECT event FROM inbox ORDER BY seq DESC")
        if f'"event":"{TRIGGERED_EVENT}"' in str(data) and f'"{resource}"' in str(data)
    ]
    stored = [
        str(data)
        for (data,) in conn.execute(
            # newest first by arrival (rowid): the walk stops at the `limit`th; only an
            # automation that fired fewer times reads the whole table (no index for this)
            "SELECT data FROM events WHERE event = ? AND resource_id = ? "
            "ORDER BY rowid DESC LIMIT ?",
            (TRIGGERED_EVENT, resource, limit),
        )
    ]
    return (queued + stored)[:limit]


def all_firing_events(conn: apsw.Connection, automation_ids: Sequence[str]) -> list[str]:
    """Every `prefect.automation.triggered` event of these automations, stored or still in
    the inbox (ReceivedEvent JSON), in no particular order."""
    resources = {automation_resource_id(a) for a in automation_ids}
    found: list[str] = []
    for chunk, marks in in_chunks(sorted(resources)):
        found.extend(
            str(data)
            for (data,) in conn.execute(
                f"SELECT data FROM events WHERE event = ? AND resource_id IN ({marks})",
                (TRIGGERED_EVENT, *chunk),
            )
        )
    for (data,) in conn.execute("SELECT event FROM inbox"):
        text = str(data)
        if f'"event":"{TRIGGERED_EVENT}"' in text and any(f'"{r}"' in text for r in resources):
            found.append(text)
    return found


def child_firings(conn: apsw.Connection, automation_id: str) -> list[ChildFiringRow]:
    """The stored firings of composite children of one automation."""
    return [
        ChildFiringRow(*row)
        for row in conn.execute(
            "SELECT automation_id, parent_trigger_id, child_trigger_id, child_firing_id, "
            "child_fired_us, child_firing FROM composite_child_firings "
            "WHERE automation_id = ? ORDER BY child_fired_us",
            (automation_id,),
        )
    ]


def parked_followers(conn: apsw.Connection, scope: str, limit: int) -> list[FollowerRow]:
    """Parked followers of a scope, oldest received first, at most `limit`."""
    return [
        FollowerRow(*row)
        for row in conn.execute(
            "SELECT follower_id, leader_id, received_us, occurred_us, event "
            "FROM ordering_followers WHERE scope = ? ORDER BY received_us LIMIT ?",
            (scope, limit),
        )
    ]


def leaders_since(conn: apsw.Connection, since_us: int, until_us: int) -> set[str]:
    """The ids other events in [since_us, until_us) say they follow."""
    return {
        str(row[0])
        for row in conn.execute(
            "SELECT DISTINCT follows FROM events WHERE occurred_us >= ? AND occurred_us < ? "
            "AND follows IS NOT NULL",
            (since_us, until_us),
        )
    }
