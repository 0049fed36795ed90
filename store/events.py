"""The events table and the inbox of events trigd made itself.

Functions of a connection, called inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import apsw

from store.connection import Connection

EventRow = tuple[str, str, str, int, int, str | None, str]
"""id, event, resource_id, occurred_us, received_us, follows, data (ReceivedEvent JSON)."""

_INSERT_NEW: Final = (
    "INSERT OR IGNORE INTO events (id, event, resource_id, occurred_us, received_us, "
    "follows, data) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)


def insert_new_events(conn: apsw.Connection, rows: Sequence[EventRow]) -> set[str]:
    """Insert the events whose id is not stored yet; return the ids inserted.

    The duplicate check and the insert are one statement: an id stored already, or met
    earlier in `rows`, is skipped (the unique index finds it) and is not returned.
    """
    return {row[0] for row in conn.executemany(_INSERT_NEW, rows)} if rows else set()


def push_inbox(conn: Connection, event_json: Iterable[str]) -> None:
    """Queue events trigd produced, to be evaluated by a later batch (counted in
    `conn.state.inbox_pushes`)."""
    conn.state.inbox_pushes += 1
    conn.executemany("INSERT INTO inbox (event) VALUES (?)", ((e,) for e in event_json))


def peek_inbox(conn: apsw.Connection, limit: int) -> list[tuple[int, str]]:
    """The oldest queued events; remove them with ``drop_inbox`` in the same transaction."""
    return [
        (int(seq), str(data))
        for seq, data in conn.execute("SELECT seq, event FROM inbox ORDER BY seq LIMIT ?", (limit,))
    ]


def drop_inbox(conn: apsw.Connection, up_to_seq: int) -> None:
    conn.execute("DELETE FROM inbox WHERE seq <= ?", (up_to_seq,))


def inbox_pushes(conn: Connection) -> int:
    """How many times `push_inbox` ran on this connection, committed or not.

    Only the daemon's writer connection queues events, so whoever found the inbox empty
    in a transaction that committed knows it is still empty while this count stays the
    same, and can skip looking (the engine does, for every batch).
    """
    return conn.state.inbox_pushes


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
