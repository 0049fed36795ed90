"""The `buckets` table: trigger state, one row per (trigger, bucketing key).

Functions of a connection, called inside the caller's transaction. Times are integer
microseconds; the bucketing key is a compact JSON array of strings, compared by equality;
`last_event` is the ReceivedEvent JSON and is parsed only when somebody asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from typing import Final

import apsw

from daemon.buckets import Bucket, EventRef
from daemon.clock import from_us, to_us

PAGE_SIZE: Final = 500
"""Buckets read per query by a proactive pass (rows), as Prefect's batch size."""

_COLUMNS: Final = "bucketing_key, start_us, end_us, count, last_event, last_operation"


KEY_CACHE_SIZE: Final = 65_536
"""Bucketing keys whose JSON is remembered (entries); keys repeat event after event."""
_key_cache: dict[tuple[str, ...], str] = {}


def key_json(key: tuple[str, ...]) -> str:
    text = _key_cache.get(key)
    if text is None:
        text = json.dumps(key, ensure_ascii=False, separators=(",", ":"))
        if len(_key_cache) >= KEY_CACHE_SIZE:
            _key_cache.clear()
        _key_cache[key] = text
    return text


def _bucket(row: tuple[object, ...]) -> Bucket:
    key, start_us, end_us, count, last_event, last_operation = row
    assert isinstance(key, str)
    assert isinstance(start_us, int)
    assert isinstance(end_us, int)
    assert isinstance(count, int)
    return Bucket(
        tuple(json.loads(key)),
        from_us(start_us),
        from_us(end_us),
        count,
        EventRef.from_json(last_event) if isinstance(last_event, str) else None,
        last_operation if isinstance(last_operation, str) else "",
    )


def read_bucket(conn: apsw.Connection, trigger_id: str, key: tuple[str, ...]) -> Bucket | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM buckets WHERE trigger_id = ? AND bucketing_key = ?",
        (trigger_id, key_json(key)),
    ).fetchone()
    return None if row is None else _bucket(row)


def write_bucket(conn: apsw.Connection, trigger_id: str, automation_id: str, b: Bucket) -> None:
    """Insert or overwrite the row for this trigger and key."""
    conn.execute(
        "INSERT INTO buckets (trigger_id, bucketing_key, automation_id, start_us, end_us, "
        "count, last_event, last_operation) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (trigger_id, bucketing_key) DO UPDATE SET "
        "automation_id = excluded.automation_id, "
        "start_us = excluded.start_us, end_us = excluded.end_us, count = excluded.count, "
        "last_event = excluded.last_event, last_operation = excluded.last_operation",
        (
            trigger_id,
            key_json(b.key),
            automation_id,
            to_us(b.start),
            to_us(b.end),
            b.count,
            None if b.last_event is None else b.last_event.json(),
            b.last_operation,
        ),
    )


def update_count(conn: apsw.Connection, trigger_id: str, b: Bucket) -> None:
    """Overwrite count, last event and operation of an existing row whose window is
    unchanged: the common case of counting one more event. Leaving `start_us` and
    `end_us` out of the SET spares their two indexes a delete and an insert each, which
    for a random key are two more random pages to write at commit."""
    conn.execute(
        "UPDATE buckets SET count = ?, last_event = ?, last_operation = ? "
        "WHERE trigger_id = ? AND bucketing_key = ?",
        (
            b.count,
            None if b.last_event is None else b.last_event.json(),
            b.last_operation,
            trigger_id,
            key_json(b.key),
        ),
    )


def delete_bucket(conn: apsw.Connection, trigger_id: str, key: tuple[str, ...]) -> None:
    conn.execute(
        "DELETE FROM buckets WHERE trigger_id = ? AND bucketing_key = ?",
        (trigger_id, key_json(key)),
    )


def iter_buckets(conn: apsw.Connection, trigger_id: str) -> Iterator[Bucket]:
    """Every bucket of a trigger ordered by start, read in pages.

    Keyset paging, so rows changed while the caller iterates are neither skipped nor (the
    caller is told by key) visited twice: a bucket moved to a later start by the caller is
    not yielded again.
    """
    seen: set[str] = set()
    after: tuple[int, str] | None = None
    while True:
        if after is None:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM buckets WHERE trigger_id = ? "
                "ORDER BY start_us, bucketing_key LIMIT ?",
                (trigger_id, PAGE_SIZE),
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM buckets WHERE trigger_id = ? "
                "AND (start_us, bucketing_key) > (?, ?) "
                "ORDER BY start_us, bucketing_key LIMIT ?",
                (trigger_id, after[0], after[1], PAGE_SIZE),
            ).fetchall()
        if not rows:
            return
        last = rows[-1]
        assert isinstance(last[1], int)
        assert isinstance(last[0], str)
        after = (last[1], last[0])
        for row in rows:
            key = row[0]
            assert isinstance(key, str)
            if key in seen:
                continue
            seen.add(key)
            yield _bucket(row)


def remove_buckets_exceeding_threshold(
    conn: apsw.Connection, trigger_id: str, threshold: int
) -> int:
    conn.execute("DELETE FROM buckets WHERE trigger_id = ? AND count >= ?", (trigger_id, threshold))
    return conn.changes()


def sweep_closed_buckets(conn: apsw.Connection, older_than_us: int) -> int:
    """Delete every bucket (all triggers) whose window ended at or before the cutoff."""
    conn.execute("DELETE FROM buckets WHERE end_us <= ?", (older_than_us,))
    return conn.changes()


def delete_trigger_buckets(conn: apsw.Connection, trigger_ids: Collection[str]) -> int:
    total = 0
    for trigger_id in trigger_ids:
        conn.execute("DELETE FROM buckets WHERE trigger_id = ?", (trigger_id,))
        total += conn.changes()
    return total
