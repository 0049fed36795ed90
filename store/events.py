"""The events table and the inbox of events trigd made itself.

Functions of a connection, called inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apsw

from store.db import in_chunks


class StoredEvent(NamedTuple):
    id: str
    event: str
    resource_id: str
    occurred_us: int
    received_us: int
    follows: str | None
    data: str  # ReceivedEvent JSON


def insert_events(conn: apsw.Connection, rows: Iterable[StoredEvent]) -> None:
    """Insert events; an id already stored is left as it is (duplicates are dropped earlier)."""
    conn.executemany(
        "INSERT OR IGNORE INTO events (id, event, resource_id, occurred_us, received_us, "
        "follows, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def known_ids(conn: apsw.Connection, ids: Sequence[str]) -> set[str]:
    """Which of these event ids are stored already (the duplicate check)."""
    found: set[str] = set()
    for chunk, marks in in_chunks(ids):
        found.update(
            row[0] for row in conn.execute(f"SELECT id FROM events WHERE id IN ({marks})", chunk)
        )
    return found


def prune_events(conn: apsw.Connection, received_before_us: int) -> int:
    """Event retention: forget events received before the cutoff; returns how many."""
    conn.execute("DELETE FROM events WHERE received_us < ?", (received_before_us,))
    return conn.changes()


def push_inbox(conn: apsw.Connection, event_json: Iterable[str]) -> None:
    """Queue events trigd produced, to be evaluated by a later batch."""
    conn.executemany("INSERT INTO inbox (event) VALUES (?)", ((e,) for e in event_json))


def peek_inbox(conn: apsw.Connection, limit: int) -> list[tuple[int, str]]:
    """The oldest queued events; remove them with ``drop_inbox`` in the same transaction."""
    return [
        (int(seq), str(data))
        for seq, data in conn.execute("SELECT seq, event FROM inbox ORDER BY seq LIMIT ?", (limit,))
    ]


def drop_inbox(conn: apsw.Connection, up_to_seq: int) -> None:
    conn.execute("DELETE FROM inbox WHERE seq <= ?", (up_to_seq,))


def inbox_size(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM inbox").fetchone()
    return 0 if row is None else int(row[0])


def read_meta(conn: apsw.Connection, key: str) -> str | None:
    """One process-wide fact from the `meta` table (e.g. the events clock)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def write_meta(conn: apsw.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
