"""The `buckets` table: trigger state, one row per (trigger, bucketing key).

Functions of a connection, called inside the caller's transaction. Times are integer
microseconds; the bucketing key is a compact JSON array of strings, compared by equality;
`last_event` is the ReceivedEvent JSON and is parsed only when somebody asks for it.

Every row says whether its trigger is Proactive: only those rows are in the partial
indexes a proactive pass reads, so reactive rows never pay for them: `buckets_due`, by
window end, finds the windows that are over (`snapshot_due`, `next_end_us`), and
`buckets_met`, by count, the windows that already saw an event (`remove_met_buckets`). A
pass therefore costs what is due, not what is open: a million devices whose heartbeats
keep their windows open cost it nothing.

`PendingBuckets` is the reactive path's write-back: within one transaction each bucket is
read at most once and written at most once, when the engine ends its unit of work, by one
`executemany` per kind of statement. It lives no longer than the transaction, so the
database stays the only state between transactions; except on a backtest's scratch store,
which one engine writes alone: there it keeps what it wrote (`PendingBuckets.keep`), as
the table holds it, for the next transactions to read, and writes it to the table only
when the sweep is about to read the table (`deferred`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Final

import apsw

from daemon.core.buckets import Bucket, EventRef
from daemon.core.clock import from_us, to_us

PAGE_SIZE: Final = 500
"""Buckets read per query by `iter_buckets` (rows), as Prefect's batch size."""

_COLUMNS: Final = "bucketing_key, start_us, end_us, count, last_event, last_operation"


KEY_CACHE_SIZE: Final = 65_536
"""Bucketing keys whose JSON is remembered (entries); keys repeat event after event."""


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def key_json(key: tuple[str, ...]) -> str:
    """A bucketing key as stored (a pure function, memoised: not state)."""
    return json.dumps(key, ensure_ascii=False, separators=(",", ":"))


def _bucket(row: tuple[object, ...], known_key: tuple[str, ...] | None = None) -> Bucket:
    key, start_us, end_us, count, last_event, last_operation = row
    assert isinstance(key, str)
    assert isinstance(start_us, int)
    assert isinstance(end_us, int)
    assert isinstance(count, int)
    return Bucket(
        tuple(json.loads(key)) if known_key is None else known_key,
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
    return None if row is None else _bucket(row, key)


_UPSERT: Final = (
    "INSERT INTO buckets (trigger_id, bucketing_key, automation_id, proactive, start_us, "
    "end_us, count, last_event, last_operation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (trigger_id, bucketing_key) DO UPDATE SET "
    "automation_id = excluded.automation_id, proactive = excluded.proactive, "
    "start_us = excluded.start_us, end_us = excluded.end_us, count = excluded.count, "
    "last_event = excluded.last_event, last_operation = excluded.last_operation"
)
_UPDATE_COUNT: Final = (
    "UPDATE buckets SET count = ?, last_event = ?, last_operation = ? "
    "WHERE trigger_id = ? AND bucketing_key = ?"
)
_DELETE: Final = "DELETE FROM buckets WHERE trigger_id = ? AND bucketing_key = ?"


_UpsertRow = tuple[str, str, str, bool, int, int, int, str | None, str]


def write_bucket(
    conn: apsw.Connection, trigger_id: str, automation_id: str, b: Bucket, *, proactive: bool
) -> None:
    """Insert or overwrite the row for this trigger and key; `proactive` is the trigger's
    posture (its rows are the ones a proactive pass pages through)."""
    conn.execute(_UPSERT, _upsert_row(trigger_id, key_json(b.key), automation_id, proactive, b))


def _upsert_row(
    trigger_id: str, key: str, automation_id: str, proactive: bool, b: Bucket
) -> _UpsertRow:
    return (
        trigger_id,
        key,
        automation_id,
        proactive,
        to_us(b.start),
        to_us(b.end),
        b.count,
        None if b.last_event is None else b.last_event.json(),
        b.last_operation,
    )


def _update_row(trigger_id: str, key: str, b: Bucket) -> tuple[int, str | None, str, str, str]:
    return (
        b.count,
        None if b.last_event is None else b.last_event.json(),
        b.last_operation,
        trigger_id,
        key,
    )


def _change(
    trigger_id: str,
    key: tuple[str, ...],
    automation_id: str,
    proactive: bool,
    before: Bucket | None,
    after: Bucket | None,
) -> tuple[str, tuple[object, ...]] | None:
    """The statement and its parameters that take a bucket's row from `before` to `after`
    (None: no row); None when nothing changed.

    A row whose window did not move gets a count-only UPDATE: the common case of counting
    one more event. Leaving `start_us` and `end_us` out of the SET spares their indexes a
    delete and an insert each, which for a random key are more random pages to write at
    commit. Any other change is the upsert of `write_bucket`, or a DELETE."""
    if after is before:
        return None
    if after is None:
        return _DELETE, (trigger_id, key_json(key))
    if before is not None and (after.start, after.end) == (before.start, before.end):
        return _UPDATE_COUNT, _update_row(trigger_id, key_json(key), after)
    return _UPSERT, _upsert_row(trigger_id, key_json(key), automation_id, proactive, after)


def save_bucket(
    conn: apsw.Connection,
    trigger_id: str,
    automation_id: str,
    key: tuple[str, ...],
    before: Bucket | None,
    after: Bucket | None,
    *,
    proactive: bool,
) -> None:
    """Write a bucket's change at once (`before` as read, `after` its new state, None
    for no row); nothing when it did not change."""
    change = _change(trigger_id, key, automation_id, proactive, before, after)
    if change is not None:
        conn.execute(*change)


def iter_buckets(conn: apsw.Connection, trigger_id: str, *, proactive: bool) -> Iterator[Bucket]:
    """Every bucket of a trigger ordered by start, read in pages.

    Keyset paging, so rows changed while the caller iterates are neither skipped nor (the
    caller is told by key) visited twice: a bucket moved to a later start by the caller is
    not yielded again. Rows are sorted per page (no index is in start order): only tests
    and one-off reads ask for this; a proactive pass reads `snapshot_due` and `read_due`.
    """
    trigger = "trigger_id = ? AND proactive" if proactive else "trigger_id = ?"
    first = (
        f"SELECT {_COLUMNS} FROM buckets WHERE {trigger} ORDER BY start_us, bucketing_key LIMIT ?"
    )
    following = (
        f"SELECT {_COLUMNS} FROM buckets WHERE {trigger} "
        "AND (start_us, bucketing_key) > (?, ?) "
        "ORDER BY start_us, bucketing_key LIMIT ?"
    )
    seen: set[str] = set()
    after: tuple[int, str] | None = None
    while True:
        if after is None:
            rows = conn.execute(first, (trigger_id, PAGE_SIZE)).fetchall()
        else:
            rows = conn.execute(following, (trigger_id, after[0], after[1], PAGE_SIZE)).fetchall()
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


def remove_met_buckets(
    conn: apsw.Connection, trigger_id: str, threshold: int, *, proactive: bool, limit: int
) -> int:
    """Delete at most `limit` of the trigger's buckets with `count >= threshold`; returns
    how many. A Proactive trigger's with a positive threshold come from `buckets_met`,
    which only holds rows that counted something (a heartbeat's restarted window holds 0),
    so finding none costs a lookup, not a scan."""
    if proactive and threshold > 0:
        where = "trigger_id = ? AND proactive AND count > 0 AND count >= ?"
    else:
        where = "trigger_id = ? AND count >= ?"
    conn.execute(
        f"DELETE FROM buckets WHERE rowid IN (SELECT rowid FROM buckets WHERE {where} LIMIT ?)",
        (trigger_id, threshold, limit),
    )
    return conn.changes()


_DUE_TABLE: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS proactive_due ("
    " start_us INTEGER NOT NULL, bucketing_key TEXT NOT NULL, bucket INTEGER NOT NULL,"
    " PRIMARY KEY (start_us, bucketing_key, bucket)) WITHOUT ROWID"
)


def snapshot_due(
    conn: apsw.Connection,
    trigger_id: str,
    as_of_us: int,
    *,
    proactive: bool,
    after: tuple[int, int] | None,
    limit: int,
) -> tuple[int, tuple[int, int] | None]:
    """Note at most `limit` more of the trigger's buckets whose window ended at or before
    `as_of_us` in the connection's temp table `proactive_due`, which keeps them in start
    order for `read_due` (`after` None: start afresh). They are found through
    `buckets_due` for a Proactive trigger, in (end, rowid) order after the keyset `after`;
    returns how many, and the keyset of the last."""
    conn.execute(_DUE_TABLE)
    if after is None:
        conn.execute("DELETE FROM temp.proactive_due")
    trigger = "trigger_id = ? AND proactive" if proactive else "trigger_id = ?"
    params: tuple[object, ...]
    if after is None:
        keyset, params = "", (trigger_id, as_of_us, limit)
    else:
        keyset = "AND (end_us, rowid) > (?, ?) "
        params = (trigger_id, as_of_us, after[0], after[1], limit)
    rows = conn.execute(
        f"SELECT rowid, end_us, start_us, bucketing_key FROM buckets WHERE {trigger} "
        f"AND end_us <= ? {keyset}ORDER BY end_us, rowid LIMIT ?",
        params,
    ).fetchall()
    if not rows:
        return 0, after
    conn.executemany(
        "INSERT INTO temp.proactive_due (start_us, bucketing_key, bucket) VALUES (?, ?, ?)",
        [(start_us, key, rowid) for rowid, _end, start_us, key in rows],
    )
    rowid, end_us = rows[-1][0], rows[-1][1]
    assert isinstance(rowid, int)
    assert isinstance(end_us, int)
    return len(rows), (end_us, rowid)


def read_due(
    conn: apsw.Connection,
    trigger_id: str,
    as_of_us: int,
    *,
    after: tuple[int, str, int] | None,
    limit: int,
) -> tuple[list[Bucket], tuple[int, str, int] | None, int]:
    """The buckets `snapshot_due` noted, in (start, key) order after the keyset `after`,
    as they are now: one changed meanwhile so that it is no longer due, or gone, is left
    out. At most `limit` noted rows are looked at; returns the buckets, the keyset of the
    last row looked at, and how many were looked at (fewer than `limit`: the end)."""
    params: tuple[object, ...]
    if after is None:
        keyset, params = "", (limit,)
    else:
        keyset, params = "WHERE (start_us, bucketing_key, bucket) > (?, ?, ?) ", (*after, limit)
    noted = conn.execute(
        "SELECT start_us, bucketing_key, bucket FROM temp.proactive_due "
        f"{keyset}ORDER BY start_us, bucketing_key, bucket LIMIT ?",
        params,
    ).fetchall()
    if not noted:
        return [], after, 0
    found: dict[int, tuple[object, ...]] = {
        int(row[0]): row[1:]
        for row in conn.executemany(
            f"SELECT rowid, {_COLUMNS} FROM buckets "
            "WHERE rowid = ? AND trigger_id = ? AND end_us <= ?",
            [(row[2], trigger_id, as_of_us) for row in noted],
        )
    }
    buckets = [_bucket(found[int(str(row[2]))]) for row in noted if int(str(row[2])) in found]
    start_us, key, rowid = noted[-1]
    assert isinstance(start_us, int)
    assert isinstance(key, str)
    assert isinstance(rowid, int)
    return buckets, (start_us, key, rowid), len(noted)


def next_end_us(
    conn: apsw.Connection, trigger_id: str, after_us: int, *, proactive: bool
) -> int | None:
    """The earliest window end of the trigger's buckets later than `after_us` (None: none)."""
    trigger = "trigger_id = ? AND proactive" if proactive else "trigger_id = ?"
    row = conn.execute(
        f"SELECT min(end_us) FROM buckets WHERE {trigger} AND end_us > ?", (trigger_id, after_us)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


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


PENDING_LIMIT: Final = 20_000
"""Buckets `PendingBuckets` holds at most (entries); past it, it writes them out early."""


class _Pending:
    """One bucket as the table holds it (`original`) and as it must be left (`current`)."""

    __slots__ = ("automation_id", "current", "dirty", "original", "proactive")

    def __init__(self, original: Bucket | None) -> None:
        self.original = original
        self.current = original
        self.dirty = False
        self.automation_id = ""
        self.proactive = False


class PendingBuckets:
    """The buckets one unit of work read and changed, written back by `flush`.

    Every read and write of a bucket during the unit must go through this object (the
    reactive path does; nothing else touches buckets inside it). `flush` must run before
    the transaction commits and before anything reads the table directly; `discard`
    when the unit fails (its transaction is rolled back). What `flush` leaves in the table
    is what writing each change at once (`save_bucket`) would have left: both take their
    statements from `_change`.

    By default nothing is kept past `flush`. `keep` makes it keep, after each flush, the
    buckets of some triggers as the table now holds them (up to a bound), so a later
    unit reads them from memory instead of the table; while what is kept is all those
    triggers have (they had no row when `keep` began, and nothing was forgotten since), a
    bucket it does not hold has no row, and is not looked for. That is only true to the
    table on a connection where nothing else changes those triggers' rows, except
    through `sweep`: the backtest's scratch store, which one engine writes alone.

    `keep(..., deferred=True)` goes one step further: the kept buckets are the state, and
    their changes reach the table only when something is about to read it: `sweep`
    writes first those whose row it would judge (either the row's or the new window
    ends by its cutoff), and `write_back` (`keep`, a reload) writes all. A bucket that
    counts many events is then written once. Only the sweep reads those triggers' rows
    (their buckets are read through this object, and a proactive pass reads only
    Proactive triggers' rows), so every read gets what writing through would have given.
    What a committed transaction changed may then be in memory only: a unit that fails
    (`discard`) loses it, and from then on every call refuses (`RuntimeError`) until
    `keep` is called again with no limit; the backtest stops at any failure anyway.
    """

    def __init__(self, limit: int = PENDING_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        self._rows: dict[tuple[str, tuple[str, ...]], _Pending] = {}
        """Every bucket known: those of the running unit, and those kept."""
        self._unit: dict[tuple[str, tuple[str, ...]], _Pending] = {}
        """The buckets the running unit read from the table or wrote."""
        self._dirty = False
        self._limit = limit
        self._kept: frozenset[str] = frozenset()
        self._keep_limit = 0
        self._complete = False
        """Whether `_rows` holds every row of the `_kept` triggers."""
        self._deferring = False
        self._deferred: dict[tuple[str, tuple[str, ...]], _Pending] = {}
        """Kept buckets changed by committed units and not written yet (`deferred`)."""
        self._deferred_low: datetime | None = None
        """The earliest window end among the rows and new states of `_deferred`: a sweep
        whose cutoff is before it has nothing of theirs to judge."""
        self._lost = False
        """A unit failed while changes were deferred: the table is behind memory."""

    def keep(
        self,
        conn: apsw.Connection,
        trigger_ids: Collection[str],
        limit: int,
        *,
        deferred: bool = False,
    ) -> None:
        """After each flush, keep the buckets of these triggers (at most `limit` buckets:
        past it, all are forgotten), and forget everything known now (what was deferred
        is written first, in a transaction of its own or the caller's). Only for a
        connection where these triggers' rows change through this object alone (see the
        class docstring); `deferred`: write their changes back only when the table is
        read; `keep(conn, (), 0)` stops."""
        if limit < 0:
            raise ValueError("limit: must not be negative")
        if self._lost:
            if limit:
                raise RuntimeError("keep: deferred bucket changes were lost; stop keeping first")
        else:
            self.write_back(conn)
        self.discard()
        self._lost = False
        self._kept = frozenset(trigger_ids) if limit else frozenset()
        self._keep_limit = limit
        self._deferring = deferred and bool(self._kept)
        self._complete = bool(self._kept) and not any(
            conn.execute("SELECT 1 FROM buckets WHERE trigger_id = ? LIMIT 1", (t,)).fetchone()
            for t in self._kept
        )

    def drop(self) -> None:
        """Stop keeping, without writing back what was deferred: for a store about to be
        thrown away (the end of a backtest's replay, whose scratch store nobody reads
        buckets from afterwards)."""
        self._deferred.clear()
        self.discard()
        self._lost = False
        self._kept = frozenset()
        self._keep_limit = 0
        self._deferring = False

    def _absent(self, trigger_id: str) -> bool:
        """Known to have no row without looking: not read, not kept, and all is kept."""
        return self._complete and trigger_id in self._kept

    def _usable(self) -> None:
        if self._lost:
            raise RuntimeError("buckets: deferred changes were lost with a failed unit")

    def read(self, conn: apsw.Connection, trigger_id: str, key: tuple[str, ...]) -> Bucket | None:
        entry = self._rows.get((trigger_id, key))
        if entry is None:
            self._usable()
            if len(self._unit) >= self._limit:
                self.flush(conn)
            found = None if self._absent(trigger_id) else read_bucket(conn, trigger_id, key)
            entry = _Pending(found)
            self._rows[trigger_id, key] = self._unit[trigger_id, key] = entry
        return entry.current

    def prefetch(
        self, conn: apsw.Connection, wanted: Sequence[tuple[str, tuple[str, ...]]]
    ) -> None:
        """Read these (trigger id, key) buckets now, in one statement: what a batch of
        events is about to `read` one by one. Skipped when it would pass the limit."""
        self._usable()
        by_json: dict[tuple[str, str], tuple[str, ...]] = {}
        rows = self._rows
        for trigger_id, key in wanted:
            if (trigger_id, key) not in rows and not self._absent(trigger_id):
                by_json[trigger_id, key_json(key)] = key
        if not by_json or len(self._unit) + len(by_json) > self._limit:
            return
        found: dict[tuple[str, str], tuple[object, ...]] = {
            (row[0], row[1]): row[1:]
            for row in conn.executemany(
                f"SELECT trigger_id, {_COLUMNS} FROM buckets "
                "WHERE trigger_id = ? AND bucketing_key = ?",
                list(by_json),
            )
        }
        unit = self._unit
        for (trigger_id, text), key in by_json.items():
            row = found.get((trigger_id, text))
            entry = _Pending(None if row is None else _bucket(row, key))
            rows[trigger_id, key] = unit[trigger_id, key] = entry

    def write(
        self,
        trigger_id: str,
        automation_id: str,
        proactive: bool,
        key: tuple[str, ...],
        existing: Bucket | None,
        stored: Bucket | None,
    ) -> None:
        """The bucket's new state (None: removed); `existing` is what `read` returned;
        `automation_id` and `proactive` as `write_bucket` takes them."""
        pair = (trigger_id, key)
        entry = self._rows.get(pair)
        if entry is None:  # written out early since it was read: `existing` is in the table
            entry = self._rows[pair] = _Pending(existing)
        entry.current = stored
        entry.automation_id = automation_id
        entry.proactive = proactive
        entry.dirty = True
        self._unit[pair] = entry
        self._dirty = True

    def flush(self, conn: apsw.Connection) -> None:
        """Write every change, one statement per kind (but those `deferred`), and forget
        what was read (but what `keep` asks to keep, now as the table holds it, or as it
        will once written back)."""
        self._usable()
        kept = self._kept
        batches = _batches()
        if not kept:
            if self._dirty:
                for pair, entry in self._unit.items():
                    if entry.dirty:
                        _add_change(batches, pair, entry)
                _execute(conn, batches)
            self.discard()
            return
        rows = self._rows
        complete = self._complete
        deferring = self._deferring
        deferred = self._deferred
        low = self._deferred_low
        for pair, entry in self._unit.items():
            if pair[0] not in kept:
                if entry.dirty:
                    _add_change(batches, pair, entry)
                del rows[pair]
            elif deferring and entry.dirty:
                deferred[pair] = entry
                for bucket in (entry.original, entry.current):
                    if bucket is not None and (low is None or bucket.end < low):
                        low = bucket.end
            else:
                if entry.dirty:
                    _add_change(batches, pair, entry)
                    entry.original = entry.current
                    entry.dirty = False
                if complete and entry.current is None:
                    del rows[pair]  # known absent anyway
        self._deferred_low = low
        _execute(conn, batches)
        self._unit.clear()
        self._dirty = False
        if len(rows) > self._keep_limit:
            self.write_back(conn)
            rows.clear()
            self._complete = False

    def write_back(self, conn: apsw.Connection, cutoff_us: int | None = None) -> None:
        """Write the deferred changes (those whose row or new state ends by `cutoff_us`
        when given), inside the caller's transaction or one of its own. Between units."""
        self._usable()
        deferred = self._deferred
        if not deferred:
            return
        if cutoff_us is None:
            due = list(deferred.items())
        else:
            low = self._deferred_low
            if low is None or to_us(low) > cutoff_us:
                return
            cutoff = from_us(cutoff_us)
            due = [
                (pair, e)
                for pair, e in deferred.items()
                if (e.original is not None and e.original.end <= cutoff)
                or (e.current is not None and e.current.end <= cutoff)
            ]
        batches = _batches()
        for pair, entry in due:
            _add_change(batches, pair, entry)
        with conn:
            _execute(conn, batches)
        rows = self._rows
        for pair, entry in due:
            del deferred[pair]
            entry.original = entry.current
            entry.dirty = False
            if entry.current is None and self._complete:
                rows.pop(pair, None)
        self._deferred_low = min(
            (b.end for e in deferred.values() for b in (e.original, e.current) if b is not None),
            default=None,
        )

    def sweep(self, conn: apsw.Connection, older_than_us: int) -> int:
        """`sweep_closed_buckets`, and forget the kept buckets it deleted. Between units
        (after `flush`); deferred changes it would judge are written first."""
        if self._unit:
            raise RuntimeError("sweep: a unit is under way (flush it first)")
        self.write_back(conn, older_than_us)
        if not self._rows:
            return sweep_closed_buckets(conn, older_than_us)
        deleted = conn.execute(
            "DELETE FROM buckets WHERE end_us <= ? RETURNING trigger_id, bucketing_key",
            (older_than_us,),
        ).fetchall()
        for trigger_id, key in deleted:
            assert isinstance(trigger_id, str)
            assert isinstance(key, str)
            self._rows.pop((trigger_id, tuple(json.loads(key))), None)
        return len(deleted)

    def discard(self) -> None:
        """Forget everything, written or not, kept or not (the transaction is being
        rolled back); deferred changes with it (see the class docstring)."""
        if self._deferred:
            self._lost = True
            self._deferred.clear()
        self._deferred_low = None
        self._rows.clear()
        self._unit.clear()
        self._dirty = False
        self._complete = False


_Batches = dict[str, list[tuple[object, ...]]]


def _batches() -> _Batches:
    return {_DELETE: [], _UPDATE_COUNT: [], _UPSERT: []}


def _add_change(batches: _Batches, pair: tuple[str, tuple[str, ...]], entry: _Pending) -> None:
    change = _change(
        pair[0], pair[1], entry.automation_id, entry.proactive, entry.original, entry.current
    )
    if change is not None:
        batches[change[0]].append(change[1])


def _execute(conn: apsw.Connection, batches: _Batches) -> None:
    for sql, params in batches.items():
        if params:
            conn.executemany(sql, params)
