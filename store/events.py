"""The events table and the inbox of events trigd made itself.

Functions of a connection, called inside the caller's transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import apsw

from daemon.core.clock import to_us
from daemon.core.event_filter import EventFilter, Order
from daemon.core.events import ReceivedEvent
from store.connection import Connection

EventRow = tuple[str, str, str, int, int, str | None, str]
"""id, event, resource_id, occurred_us, received_us, follows, data (ReceivedEvent JSON)."""

_INSERT: Final = (
    "INSERT OR IGNORE INTO events (id, event, resource_id, occurred_us, received_us, "
    "follows, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_NEW: Final = _INSERT + " RETURNING id"
_SAVEPOINT: Final = "insert_new_events"


def insert_new_events(conn: apsw.Connection, rows: Sequence[EventRow]) -> set[str]:
    """Insert the events whose id is not stored yet; return the ids inserted.

    The duplicate check and the insert are one statement: an id stored already, or met
    earlier in `rows`, is skipped (the unique index finds it) and is not returned.
    Duplicates are rare, so the rows are first inserted without `RETURNING` (which costs
    about 1.5 µs a row) under a savepoint: when every row went in, every id is new;
    otherwise that insert is rolled back and done again, returning the ids.
    """
    if not rows:
        return set()
    before = conn.total_changes()
    conn.execute(f"SAVEPOINT {_SAVEPOINT}")
    try:
        conn.executemany(_INSERT, rows)
        if conn.total_changes() - before == len(rows):
            inserted = {row[0] for row in rows}
        else:
            conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
            inserted = {row[0] for row in conn.executemany(_INSERT_NEW, rows)}
    except BaseException:
        if conn.in_transaction:  # an I/O error may have ended the transaction already
            conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
            conn.execute(f"RELEASE {_SAVEPOINT}")
        raise
    conn.execute(f"RELEASE {_SAVEPOINT}")
    return inserted


def rows_in_occurred_order(
    conn: apsw.Connection, since_us: int, until_us: int, page: int
) -> Iterator[list[EventRow]]:
    """The rows of the events that occurred in [since_us, until_us), as stored (every
    column of an `EventRow`, for another events table), in `occurred` order (ties in
    arrival order: rowid), `page` at a time. One statement stepped as the caller goes,
    walking the `events_occurred` index (whose entries end with the rowid, so no sort),
    and the caller's read transaction keeps one snapshot until the last page."""
    cursor = conn.execute(
        "SELECT id, event, resource_id, occurred_us, received_us, follows, data FROM events "
        "WHERE occurred_us >= ? AND occurred_us < ? ORDER BY occurred_us, rowid",
        (since_us, until_us),
    )
    while rows := list(itertools.islice(cursor, page)):
        yield rows


INBOX_MADE_LIMIT: Final = 1_024
"""Models of queued events kept beside their JSON at most (`ConnectionState.inbox_made`)."""


def push_inbox(conn: Connection, events: Iterable[ReceivedEvent]) -> None:
    """Queue events trigd produced, to be evaluated by a later batch (counted in
    `conn.state.inbox_pushes`); each model is kept by its JSON for the batch that drains
    it (`take_made`)."""
    state = conn.state
    state.inbox_pushes += 1
    made = state.inbox_made
    if len(made) > INBOX_MADE_LIMIT:
        made.clear()  # not drained here (rolled back, or left to the pump): parse those
    rows = []
    for event in events:
        data = event.model_dump_json()
        made[data] = event
        rows.append((data,))
    conn.executemany("INSERT INTO inbox (event) VALUES (?)", rows)


def take_made(conn: Connection, data: str) -> ReceivedEvent | None:
    """The model that `push_inbox` made ``data`` from on this connection, if kept."""
    return conn.state.inbox_made.pop(data, None)


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


# --- events queries (events out, POST /api/events/filter) --------------------------------


def _any_prefix(column: str, prefixes: Sequence[str], params: list[object]) -> str:
    """SQL for "``column`` starts with one of ``prefixes``", case-sensitive (LIKE is not)."""
    tests = []
    for prefix in prefixes:
        tests.append(f"substr({column}, 1, ?) = ?")
        params += [len(prefix), prefix]
    return "(" + " OR ".join(tests) + ")"


def _one_of(column: str, values: Sequence[str], params: list[object]) -> str:
    params += values
    return f"{column} IN ({', '.join('?' * len(values))})"


def filter_sql(flt: EventFilter) -> tuple[str, list[object]]:
    """The WHERE clause (and its parameters) of ``flt``, resolved: what
    ``daemon.core.event_filter.matches`` says of one event, for the stored ones."""
    clauses: list[str] = []
    params: list[object] = []
    occurred = flt.occurred
    if occurred.since is not None:
        clauses.append("occurred_us >= ?")
        params.append(to_us(occurred.since))
    if occurred.until is not None:
        clauses.append("occurred_us <= ?")
        params.append(to_us(occurred.until))
    names = flt.event
    if names is not None:
        if names.prefix:
            clauses.append(_any_prefix("event", names.prefix, params))
        if names.exclude_prefix:
            clauses.append("NOT " + _any_prefix("event", names.exclude_prefix, params))
        if names.name:
            clauses.append(_one_of("event", names.name, params))
        if names.exclude_name:
            clauses.append("NOT " + _one_of("event", names.exclude_name, params))
    resources = flt.resource
    if resources is not None:
        if resources.id:
            clauses.append(_one_of("resource_id", resources.id, params))
        if resources.id_prefix:
            clauses.append(_any_prefix("resource_id", resources.id_prefix, params))
    if flt.id.id:
        clauses.append(_one_of("id", [str(i) for i in flt.id.id], params))
    if flt.needs_whole_event():
        clauses.append(f"{BEYOND_COLUMNS}(data)")
    return (" AND ".join(clauses) or "1"), params


BEYOND_COLUMNS: Final = "trigd_filter_beyond_columns"
"""The SQL function for the criteria the columns do not hold (labels, related resources):
the filter's own Python test of the stored event, registered for each query."""


def _register(conn: apsw.Connection, flt: EventFilter) -> None:
    if not flt.needs_whole_event():
        return

    def beyond(*values: Any) -> int:
        (data,) = values
        return int(flt.matches_beyond_columns(ReceivedEvent.model_validate_json(data)))

    conn.create_scalar_function(BEYOND_COLUMNS, beyond, 1, deterministic=True)


def query_event_rows(
    conn: apsw.Connection, flt: EventFilter, limit: int, offset: int = 0
) -> list[tuple[str, str]]:
    """(id, ReceivedEvent JSON) of the stored events ``flt`` (resolved) matches, in its
    ``order`` of ``occurred`` (ties in arrival order), ``limit`` of them from ``offset``."""
    _register(conn, flt)
    where, params = filter_sql(flt)
    direction = "ASC" if flt.order is Order.ASC else "DESC"
    sql = (
        f"SELECT id, data FROM events WHERE {where} "
        f"ORDER BY occurred_us {direction}, rowid {direction} LIMIT ? OFFSET ?"
    )
    return [(str(i), str(d)) for i, d in conn.execute(sql, (*params, limit, offset))]


def query_events(conn: apsw.Connection, flt: EventFilter, limit: int, offset: int = 0) -> list[str]:
    """``query_event_rows`` without the ids."""
    return [data for _, data in query_event_rows(conn, flt, limit, offset)]


def count_events(conn: apsw.Connection, flt: EventFilter) -> int:
    """How many stored events ``flt`` (resolved) matches."""
    _register(conn, flt)
    where, params = filter_sql(flt)
    row = conn.execute(f"SELECT count(*) FROM events WHERE {where}", params).fetchone()
    return 0 if row is None else int(row[0])
