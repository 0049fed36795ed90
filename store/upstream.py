"""What `[upstream]` keeps in the database: the forward cursor, the subscribe position, and
the event retention that spares events not yet forwarded.

Commit order is the `events` table's rowid: one writer appends rows, and SQLite gives a new
row the largest rowid plus one, so a row committed later always has a larger rowid than
every row committed before it. A reader that has seen every row up to rowid N has seen
everything committed before the first row past N. The cursor is that N, in `meta`.

SQLite reuses rowids once the largest row is deleted, which would put new events behind
the cursor. `prune_events_sparing` therefore never deletes the newest row.

Functions of a connection, called inside the caller's transaction (readers: any read-only
connection).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Final

import apsw
import attrs

from store.events import read_meta, write_meta

FORWARD_CURSOR_KEY: Final = "upstream_forwarded"
"""The `meta` row holding the rowid of the last event the upstream confirmed."""
SUBSCRIBE_POSITION_KEY: Final = "upstream_position"
"""The `meta` row holding the latest `occurred` (ISO 8601) of the events taken from the
upstream, from which a reconnect backfills."""


@attrs.frozen
class ForwardRow:
    seq: int  # the rowid: commit order
    received_us: int
    data: str  # the ReceivedEvent JSON, as stored
    id: str  # the event's id (to name one the upstream refuses)


@attrs.frozen
class Backlog:
    """Events committed but not yet confirmed by the upstream."""

    count: int
    oldest_received_us: int | None  # None when there are none


def forward_cursor(conn: apsw.Connection) -> int:
    """The rowid of the last event the upstream confirmed; 0 before the first."""
    value = read_meta(conn, FORWARD_CURSOR_KEY)
    return int(value) if value is not None else 0


def set_forward_cursor(conn: apsw.Connection, seq: int) -> None:
    """Move the cursor forward (never back: a stale writer cannot undo a confirmation).
    The first call writes it even at 0: forwarding has started (`trigd status`)."""
    current = read_meta(conn, FORWARD_CURSOR_KEY)
    if current is None or seq > int(current):
        write_meta(conn, FORWARD_CURSOR_KEY, str(seq))


def unforwarded_page(conn: apsw.Connection, after: int, limit: int) -> list[ForwardRow]:
    """The next events in commit order after rowid `after`, at most `limit`."""
    return [
        ForwardRow(int(seq), int(received), str(data), str(event_id))
        for seq, received, data, event_id in conn.execute(
            "SELECT rowid, received_us, data, id FROM events WHERE rowid > ? "
            "ORDER BY rowid LIMIT ?",
            (after, limit),
        )
    ]


def backlog(conn: apsw.Connection, after: int) -> Backlog:
    """How many events wait past the cursor `after`, and when the oldest was received."""
    row = conn.execute(
        "SELECT count(*), min(received_us) FROM events WHERE rowid > ?", (after,)
    ).fetchone()
    if row is None or not row[0]:
        return Backlog(0, None)
    return Backlog(int(row[0]), int(row[1]))


def subscribe_position(conn: apsw.Connection) -> datetime | None:
    value = read_meta(conn, SUBSCRIBE_POSITION_KEY)
    return None if value is None else datetime.fromisoformat(json.loads(value))


def set_subscribe_position(conn: apsw.Connection, occurred: datetime) -> None:
    """Keep the latest position: an older one (a backfilled event) never moves it back."""
    current = subscribe_position(conn)
    if current is None or occurred > current:
        write_meta(conn, SUBSCRIBE_POSITION_KEY, json.dumps(occurred.isoformat()))


@attrs.frozen
class Pruned:
    events: int  # rows deleted
    unforwarded: int  # of which the upstream had not confirmed (past the backlog bound)


_NEWEST: Final = "(SELECT max(rowid) FROM events)"


def prune_events_sparing(
    conn: apsw.Connection,
    received_before_us: int,
    *,
    cursor: int | None = None,
    backlog_before_us: int | None = None,
) -> Pruned:
    """Event retention: delete events received before `received_before_us`, except the
    newest row (rowids must not be reused, see the module docstring). With a forward
    `cursor`, an event past it (not yet forwarded) is deleted only when it was also
    received before `backlog_before_us`: past the backlog bound the oldest are dropped,
    and counted in `unforwarded`."""
    if cursor is None:
        conn.execute(
            f"DELETE FROM events WHERE received_us < ? AND rowid < {_NEWEST}",
            (received_before_us,),
        )
        return Pruned(conn.changes(), 0)
    bound = received_before_us if backlog_before_us is None else backlog_before_us
    bound = min(bound, received_before_us)
    row = conn.execute(
        f"SELECT count(*) FROM events WHERE received_us < ? AND rowid > ? AND rowid < {_NEWEST}",
        (bound, cursor),
    ).fetchone()
    dropped = 0 if row is None else int(row[0])
    conn.execute(
        "DELETE FROM events WHERE received_us < ? AND (rowid <= ? OR received_us < ?) "
        f"AND rowid < {_NEWEST}",
        (received_before_us, cursor, bound),
    )
    return Pruned(conn.changes(), dropped)
