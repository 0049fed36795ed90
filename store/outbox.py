"""The outbox: one row per triggered action, committed with the firing that made it.

Functions of a connection, called inside the caller's transaction. `enqueue` is the
trigger engine's side; the rest is the sender's and the operator's: claiming due rows
under a lease (shared round-robin across endpoints, `daemon/core/delivery.py: share_slots`, so
no endpoint, however slow or dead, takes the slots the others need), recording
attempts, and moving rows through the state table of `daemon/core/delivery.py`. Rows become
`OutboxRow`s through one converter, which validates the status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import apsw
import attrs

from daemon.core.delivery import (
    DeliveryState,
    IllegalMove,
    Move,
    Slots,
    advance,
    share_slots,
    sources,
)

LEASE_EXPIRED_ERROR: Final = "lease expired before the attempt finished (sender stopped?)"


class NewOutboxRow(NamedTuple):
    id: str  # TriggeredAction.id; also the webhook-id of every attempt
    automation_id: str
    action_index: int
    action_type: str
    endpoint: str | None  # scheme://host:port for webhooks, None for do-nothing
    document: str  # TriggeredAction JSON
    created_us: int


def enqueue(conn: apsw.Connection, rows: Iterable[NewOutboxRow]) -> None:
    """Add pending rows, due at once."""
    conn.executemany(
        "INSERT INTO outbox (id, automation_id, action_index, action_type, endpoint, status, "
        "document, created_us, next_attempt_us) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        (
            (
                r.id,
                r.automation_id,
                r.action_index,
                r.action_type,
                r.endpoint,
                r.document,
                r.created_us,
                r.created_us,
            )
            for r in rows
        ),
    )


class UnknownDelivery(LookupError):
    """No outbox row has this id."""


class AmbiguousDelivery(LookupError):
    """More than one outbox row has an id starting with this prefix."""

    def __init__(self, prefix: str, candidates: Sequence[str]) -> None:
        shown = ", ".join(candidates[:AMBIGUOUS_SHOWN])
        more = len(candidates) > AMBIGUOUS_SHOWN
        super().__init__(
            f"{prefix!r} is the start of more than one delivery id: {shown}"
            + (", ..." if more else "")
            + "; give more of the id"
        )
        self.candidates = list(candidates)


AMBIGUOUS_SHOWN: Final = 10


@attrs.frozen
class OutboxRow:
    id: str
    automation_id: str
    action_index: int
    action_type: str
    endpoint: str | None
    status: DeliveryState
    document: str
    created_us: int
    next_attempt_us: int
    lease_until_us: int | None
    attempts: int
    last_error: str | None
    finished_us: int | None
    revived_us: int | None

    @property
    def window_start_us(self) -> int:
        """Where `max_age` and the backoff schedule count from."""
        return self.revived_us if self.revived_us is not None else self.created_us


_COLUMNS: Final = (
    "id, automation_id, action_index, action_type, endpoint, status, document, created_us, "
    "next_attempt_us, lease_until_us, attempts, last_error, finished_us, revived_us"
)


def _row(values: Sequence[Any]) -> OutboxRow:
    """The one converter from a database row; a status outside the table is an error."""
    try:
        status = DeliveryState(values[5])
    except ValueError:
        raise ValueError(f"outbox row {values[0]!r} has an unknown status {values[5]!r}") from None
    return OutboxRow(
        id=str(values[0]),
        automation_id=str(values[1]),
        action_index=int(values[2]),
        action_type=str(values[3]),
        endpoint=None if values[4] is None else str(values[4]),
        status=status,
        document=str(values[6]),
        created_us=int(values[7]),
        next_attempt_us=int(values[8]),
        lease_until_us=None if values[9] is None else int(values[9]),
        attempts=int(values[10]),
        last_error=None if values[11] is None else str(values[11]),
        finished_us=None if values[12] is None else int(values[12]),
        revived_us=None if values[13] is None else int(values[13]),
    )


def get(conn: apsw.Connection, row_id: str) -> OutboxRow:
    found = conn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (row_id,)).fetchone()
    if found is None:
        raise UnknownDelivery(f"no delivery with id {row_id!r}")
    return _row(found)


def _move(conn: apsw.Connection, row_id: str, move: Move, assignments: str, *args: Any) -> None:
    """Apply `move` to one row: the UPDATE only matches rows in a legal source state, and a
    miss says why (no such row, or IllegalMove naming the state it is in)."""
    starts = sorted(s.value for s in sources(move))
    targets = {advance(DeliveryState(s), move) for s in starts}
    assert len(targets) == 1, f"{move} must lead to one state"
    marks = ", ".join("?" * len(starts))
    conn.execute(
        f"UPDATE outbox SET status = ?, {assignments} WHERE id = ? AND status IN ({marks})",
        (targets.pop().value, *args, row_id, *starts),
    )
    if conn.changes() == 0:
        raise IllegalMove(get(conn, row_id).status, move)


# --- the sender's side ---------------------------------------------------------------------


def release_leases(conn: apsw.Connection, now_us: int, *, everything: bool = False) -> int:
    """Put in-flight rows whose lease ran out back to pending, due at once, recording the
    unfinished attempt. `everything` releases all (the sender starting: any row still in
    flight belongs to a previous process). Returns how many."""
    where = "status = 'in_flight'" + ("" if everything else " AND lease_until_us <= ?")
    args: tuple[int, ...] = () if everything else (now_us,)
    ids = [str(r[0]) for r in conn.execute(f"SELECT id FROM outbox WHERE {where}", args)]
    for row_id in ids:
        record_attempt(
            conn,
            row_id,
            attempted_us=now_us,
            latency_us=None,
            status_code=None,
            error=LEASE_EXPIRED_ERROR,
        )
        _move(
            conn,
            row_id,
            Move.LEASE_EXPIRED,
            "lease_until_us = NULL, last_error = ?, next_attempt_us = min(next_attempt_us, ?)",
            LEASE_EXPIRED_ERROR,
            now_us,
        )
    return len(ids)


_UNDER_LEASE: Final = "id = ? AND status = 'in_flight' AND lease_until_us = ?"
"""The row is still in flight under the lease its claim gave it (params: id, lease)."""


def _due_endpoints(conn: apsw.Connection) -> list[str]:
    """Distinct endpoints of pending rows, one index seek each (there are few endpoints,
    while one dead endpoint may have a long queue)."""
    return [
        str(r[0])
        for r in conn.execute(
            "WITH RECURSIVE eps(ep) AS ("
            " SELECT (SELECT min(endpoint) FROM outbox WHERE status = 'pending')"
            " UNION ALL"
            " SELECT (SELECT min(endpoint) FROM outbox WHERE status = 'pending' AND endpoint > ep)"
            " FROM eps WHERE ep IS NOT NULL"
            ") SELECT ep FROM eps WHERE ep IS NOT NULL"
        )
    ]


def claim(
    conn: apsw.Connection,
    now_us: int,
    lease_until_us: int,
    *,
    limit: int,
    per_endpoint: int,
    busy: Mapping[str | None, int] | None = None,
) -> list[OutboxRow]:
    """Claim up to `limit` due rows, at most `per_endpoint` in flight per endpoint counting
    the `busy` ones already held, no endpoint failing (`claim_slots` with a plain share);
    oldest due first."""
    slots = Slots(free=limit, per_endpoint=per_endpoint, busy=busy or {})
    rows = claim_slots(conn, now_us, lease_until_us, slots)
    return sorted(rows, key=lambda row: (row.next_attempt_us, row.id))


def claim_slots(
    conn: apsw.Connection, now_us: int, lease_until_us: int, slots: Slots
) -> list[OutboxRow]:
    """Claim the due rows `share_slots` picks for `slots` (round-robin across endpoints;
    rows without an endpoint, do-nothing, share one queue), in the order it picked them,
    which is the order the endpoints took their turns. Claimed rows are `in_flight` until
    `lease_until_us`."""
    if slots.free <= 0:
        return []
    due: list[tuple[str | None, list[tuple[int, str]]]] = []
    endpoints: list[str | None] = [None, *_due_endpoints(conn)]
    for endpoint in endpoints:
        room = min(slots.free, slots.room(endpoint))
        if room <= 0:
            continue
        where = "endpoint IS NULL" if endpoint is None else "endpoint = ?"
        args: tuple[Any, ...] = () if endpoint is None else (endpoint,)
        rows = [
            (int(due_us), str(row_id))
            for row_id, due_us in conn.execute(
                f"SELECT id, next_attempt_us FROM outbox WHERE status = 'pending' AND {where} "
                "AND next_attempt_us <= ? ORDER BY next_attempt_us LIMIT ?",
                (*args, now_us, room),
            )
        ]
        if rows:
            due.append((endpoint, rows))
    due.sort(key=lambda item: item[1][0])  # endpoints by their oldest due row
    claimed: list[OutboxRow] = []
    for _, row_id in share_slots(dict(due), slots):
        _move(conn, row_id, Move.CLAIM, "lease_until_us = ?", lease_until_us)
        claimed.append(get(conn, row_id))
    return claimed


def failing_endpoints(conn: apsw.Connection) -> set[str]:
    """Endpoints with a pending row whose last attempt failed (it waits for its retry): the
    sender starts with them failing rather than trusting a dead endpoint again with every
    slot it may have. A lease that ran out says nothing of the endpoint."""
    return {
        str(r[0])
        for r in conn.execute(
            "SELECT DISTINCT endpoint FROM outbox WHERE status = 'pending' AND attempts > 0 "
            "AND endpoint IS NOT NULL AND last_error IS NOT NULL AND last_error != ?",
            (LEASE_EXPIRED_ERROR,),
        )
    }


def extend_lease(conn: apsw.Connection, row_id: str, held_us: int, until_us: int) -> bool:
    """Push a claimed row's lease from `held_us` out to `until_us` (an attempt allowed to
    take longer than the configured lease); False when the row no longer holds `held_us`."""
    conn.execute(
        f"UPDATE outbox SET lease_until_us = ? WHERE {_UNDER_LEASE}", (until_us, row_id, held_us)
    )
    return conn.changes() > 0


def next_due_us(conn: apsw.Connection, *, after_us: int) -> int | None:
    """When the next pending row falls due, strictly after `after_us`. Rows due already but
    left unclaimed are waiting for a slot, which wakes the sender by itself."""
    row = conn.execute(
        "SELECT min(next_attempt_us) FROM outbox WHERE status = 'pending' AND next_attempt_us > ?",
        (after_us,),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def record_attempt(
    conn: apsw.Connection,
    row_id: str,
    *,
    attempted_us: int,
    latency_us: int | None,
    status_code: int | None,
    error: str | None,
) -> None:
    """Keep one attempt's facts and count it against the row. The row's `last_error` is
    the move's to set (`release_leases`), so it is written once."""
    conn.execute(
        "INSERT INTO delivery_attempts (outbox_id, attempted_us, latency_us, status_code, error) "
        "VALUES (?, ?, ?, ?, ?)",
        (row_id, attempted_us, latency_us, status_code, error),
    )
    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (row_id,))


_FINISH_ASSIGNMENTS: Final[Mapping[Move, str]] = MappingProxyType(
    {
        Move.SUCCEED: "finished_us = :at, last_error = NULL",
        Move.RETRY: "next_attempt_us = :at, last_error = :reason",
        Move.DIE: "finished_us = :at, last_error = :reason",
    }
)
"""What each way out of `in_flight` writes besides the status (`finish`); `:at` is when
the row finished, or when it is due again for a retry."""


def finish(
    conn: apsw.Connection,
    row_id: str,
    lease_until_us: int | None,
    move: Move,
    *,
    at_us: int,
    reason: str | None,
    attempted_us: int,
    latency_us: int | None,
    status_code: int | None,
    error: str | None,
) -> bool:
    """An attempt's result in one UPDATE of the row (a claim's lease checked, the attempt
    counted and the row moved) and one INSERT of the attempt: one per delivery, so a storm
    rewrites each row once. False, writing nothing, when the row is no longer in flight
    under `lease_until_us` (released since, or claimed again: a later lease)."""
    target = advance(DeliveryState.IN_FLIGHT, move)
    conn.execute(
        f"UPDATE outbox SET status = :to, attempts = attempts + 1, lease_until_us = NULL, "
        f"{_FINISH_ASSIGNMENTS[move]} "
        "WHERE id = :id AND status = 'in_flight' AND lease_until_us = :lease",
        {"to": target.value, "at": at_us, "reason": reason, "id": row_id, "lease": lease_until_us},
    )
    if conn.changes() == 0:
        return False
    conn.execute(
        "INSERT INTO delivery_attempts (outbox_id, attempted_us, latency_us, status_code, error) "
        "VALUES (?, ?, ?, ?, ?)",
        (row_id, attempted_us, latency_us, status_code, error),
    )
    return True


# --- the operator's side -------------------------------------------------------------------


@attrs.frozen
class AttemptRow:
    attempted_us: int
    latency_us: int | None
    status_code: int | None
    error: str | None


def attempts(conn: apsw.Connection, row_id: str) -> list[AttemptRow]:
    """Every attempt at one row, oldest first."""
    return [
        AttemptRow(
            int(at), None if lat is None else int(lat), None if code is None else int(code), err
        )
        for at, lat, code, err in conn.execute(
            "SELECT attempted_us, latency_us, status_code, error FROM delivery_attempts "
            "WHERE outbox_id = ? ORDER BY attempted_us, id",
            (row_id,),
        )
    ]


def list_rows(
    conn: apsw.Connection, *, status: DeliveryState | None = None, limit: int = 50
) -> list[OutboxRow]:
    """The newest rows first, optionally of one status."""
    where, args = ("WHERE status = ?", (status.value,)) if status is not None else ("", ())
    return [
        _row(r)
        for r in conn.execute(
            f"SELECT {_COLUMNS} FROM outbox {where} ORDER BY created_us DESC, id LIMIT ?",
            (*args, limit),
        )
    ]


def revive(conn: apsw.Connection, row_id: str, now_us: int) -> None:
    """A dead row goes back to pending, due now, with a fresh `max_age` window and backoff
    schedule (its attempts stay in delivery_attempts). IllegalMove if it is not dead."""
    _move(
        conn,
        row_id,
        Move.REVIVE,
        "next_attempt_us = ?, revived_us = ?, attempts = 0, finished_us = NULL",
        now_us,
        now_us,
    )


def resolve_id(conn: apsw.Connection, prefix: str) -> str:
    """The one row id that is `prefix` or starts with it; UnknownDelivery when none,
    AmbiguousDelivery (naming the candidates) when several and none is exactly `prefix`."""
    if not prefix:
        raise UnknownDelivery("an empty delivery id matches nothing")
    found = [
        str(r[0])
        for r in conn.execute(
            "SELECT id FROM outbox WHERE substr(id, 1, ?) = ? ORDER BY id LIMIT ?",
            (len(prefix), prefix, AMBIGUOUS_SHOWN + 1),
        )
    ]
    if prefix in found:
        return prefix
    if not found:
        raise UnknownDelivery(f"no delivery id starts with {prefix!r}")
    if len(found) > 1:
        raise AmbiguousDelivery(prefix, found)
    return found[0]


def cancel(conn: apsw.Connection, row_id: str, now_us: int) -> None:
    """A pending or dead row becomes cancelled, final: never claimed or revived again.
    IllegalMove otherwise (in flight: its attempt may be reaching the endpoint)."""
    _move(
        conn,
        row_id,
        Move.CANCEL,
        "lease_until_us = NULL, finished_us = ?, last_error = ?",
        now_us,
        "cancelled by an operator",
    )


def send_now(conn: apsw.Connection, row_id: str, now_us: int) -> None:
    """A pending row falls due at `now_us` (its backoff wait cut short); the sender takes it
    at its next claim. IllegalMove (as a claim would be refused) when it is not pending."""
    conn.execute(
        "UPDATE outbox SET next_attempt_us = min(next_attempt_us, ?) "
        "WHERE id = ? AND status = 'pending'",
        (now_us, row_id),
    )
    if conn.changes() == 0:
        raise IllegalMove(get(conn, row_id).status, Move.CLAIM)


def revive_all_dead(conn: apsw.Connection, now_us: int) -> int:
    ids = [str(r[0]) for r in conn.execute("SELECT id FROM outbox WHERE status = 'dead'")]
    for row_id in ids:
        revive(conn, row_id, now_us)
    return len(ids)


def prune_finished(conn: apsw.Connection, finished_before_us: int) -> int:
    """Outbox retention: forget delivered, dead and cancelled rows (and their attempts)
    finished before the cutoff; returns how many rows."""
    conn.execute(
        "DELETE FROM delivery_attempts WHERE outbox_id IN (SELECT id FROM outbox "
        "WHERE status IN ('delivered', 'dead', 'cancelled') AND finished_us < ?)",
        (finished_before_us,),
    )
    conn.execute(
        "DELETE FROM outbox WHERE status IN ('delivered', 'dead', 'cancelled') AND finished_us < ?",
        (finished_before_us,),
    )
    return conn.changes()
