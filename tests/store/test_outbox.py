"""The outbox store (claims, leases, fairness, attempts, revival, retention) and the
`trigd outbox` commands, on real SQLite files."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from daemon.cli.outbox_cli import outbox_command
from daemon.core.clock import to_us
from daemon.core.delivery import DeliveryState, IllegalMove, Move, Slots
from store import outbox
from store.db import Store
from tests.support.webhook_receiver import T0

NOW = to_us(T0)
SECOND = 1_000_000


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "trigd.db", synchronous="normal")


def add(store: Store, row_id: str, endpoint: str | None, created_us: int = NOW) -> None:
    with store.conn:
        outbox.enqueue(
            store.conn,
            [outbox.NewOutboxRow(row_id, "auto-1", 0, "call-webhook", endpoint, "{}", created_us)],
        )


def claim(store: Store, now_us: int = NOW, **kwargs: object) -> list[outbox.OutboxRow]:
    options: dict[str, object] = {"limit": 10, "per_endpoint": 10}
    options.update(kwargs)
    with store.conn:
        rows = outbox.claim(store.conn, now_us, now_us + 60 * SECOND, **options)  # type: ignore[arg-type]
    return rows


def finish(
    store: Store, row_id: str, move: Move, at_us: int = NOW, reason: str | None = None
) -> bool:
    """The sender's way out of `in_flight`, under the lease the row's claim gave it: an
    attempt answered with `reason` (None: delivered) counted, and the row moved."""
    lease = outbox.get(store.conn, row_id).lease_until_us
    return outbox.finish(
        store.conn,
        row_id,
        lease,
        move,
        at_us=at_us,
        reason=reason,
        attempted_us=NOW,
        latency_us=1,
        status_code=None if reason is None else 500,
        error=reason,
    )


def test_claim_is_oldest_first_and_only_due_rows(store: Store) -> None:
    add(store, "b", "http://a:80", NOW + 2)
    add(store, "a", "http://a:80", NOW + 1)
    add(store, "later", "http://a:80", NOW + 10 * SECOND)
    rows = claim(store, NOW + 5)
    assert [r.id for r in rows] == ["a", "b"]
    assert all(r.status is DeliveryState.IN_FLIGHT for r in rows)
    assert all(r.lease_until_us == NOW + 5 + 60 * SECOND for r in rows)
    assert claim(store, NOW + 5) == []  # claimed rows are not claimed twice


def test_claim_bounds_each_endpoint_counting_busy_slots(store: Store) -> None:
    for i in range(5):
        add(store, f"slow-{i}", "http://slow:80", NOW + i)
    for i in range(2):
        add(store, f"fast-{i}", "http://fast:80", NOW + 10 + i)
    add(store, "nothing", None, NOW + 20)
    rows = claim(store, NOW + SECOND, limit=5, per_endpoint=2, busy={"http://slow:80": 1})
    ids = [r.id for r in rows]
    assert ids == ["slow-0", "fast-0", "fast-1", "nothing"]


def test_limit_bounds_the_whole_claim(store: Store) -> None:
    for i in range(6):
        add(store, f"r{i}", f"http://h{i}:80", NOW + i)
    assert [r.id for r in claim(store, NOW + SECOND, limit=3, per_endpoint=1)] == ["r0", "r1", "r2"]


def test_claim_slots_shares_round_robin_and_probes_failing_endpoints(store: Store) -> None:
    """The dead endpoint's backlog is older than everything else: it still gets one probe
    slot, and the others their turns, the one served longest ago first."""
    for i in range(5):
        add(store, f"dead-{i}", "http://dead:80", NOW - 100 + i)
    for i in range(3):
        add(store, f"a-{i}", "http://a:80", NOW + i)
        add(store, f"b-{i}", "http://b:80", NOW + 10 + i)
    slots = Slots(
        free=5,
        per_endpoint=2,
        probes_free=1,
        failing=frozenset({"http://dead:80"}),
        turns={"http://a:80": 2, "http://b:80": 1, "http://dead:80": 0},
    )
    with store.conn:
        rows = outbox.claim_slots(store.conn, NOW + SECOND, NOW + 60 * SECOND, slots)
    assert [r.id for r in rows] == ["dead-0", "b-0", "a-0", "b-1", "a-1"]
    assert all(r.status is DeliveryState.IN_FLIGHT for r in rows)
    no_probe = Slots(free=5, per_endpoint=2, failing=frozenset({"http://dead:80"}))
    with store.conn:
        rows = outbox.claim_slots(store.conn, NOW + SECOND, NOW + 60 * SECOND, no_probe)
    assert [r.id for r in rows] == ["a-2", "b-2"]


def test_failing_endpoints_are_those_with_a_failed_row_waiting(store: Store) -> None:
    """What the sender starts from: a row waiting for its retry; not a lease that ran
    out, nor a delivered or revived row, nor one never tried."""
    for row_id in ("retry", "released", "delivered", "revived"):
        add(store, row_id, f"http://{row_id}:80")
    [lease] = {r.lease_until_us for r in claim(store)}
    assert lease is not None
    add(store, "fresh", "http://fresh:80")
    with store.conn:
        finish(store, "retry", Move.RETRY, NOW + 5 * SECOND, "HTTP 503")
        finish(store, "delivered", Move.SUCCEED)
        finish(store, "revived", Move.DIE, reason="HTTP 400: not retried")
        outbox.revive(store.conn, "revived", NOW)
    with store.conn:
        outbox.release_leases(store.conn, lease)  # "released": its lease ran out
    assert outbox.get(store.conn, "released").attempts == 1
    assert outbox.failing_endpoints(store.conn) == {"http://retry:80"}


def test_expired_lease_is_released_and_reclaimed(store: Store) -> None:
    add(store, "r", "http://a:80")
    [row] = claim(store, NOW)
    lease = row.lease_until_us
    assert lease is not None
    with store.conn:
        assert outbox.release_leases(store.conn, lease - 1) == 0
        assert outbox.release_leases(store.conn, lease) == 1
    row = outbox.get(store.conn, "r")
    assert row.status is DeliveryState.PENDING
    assert row.attempts == 1
    assert row.last_error == outbox.LEASE_EXPIRED_ERROR
    assert [r.id for r in claim(store, lease)] == ["r"]
    [attempt] = outbox.attempts(store.conn, "r")
    assert attempt.error == outbox.LEASE_EXPIRED_ERROR
    assert attempt.status_code is None


def test_only_a_row_in_flight_under_its_lease_finishes(store: Store) -> None:
    """A pending row, or one finished already, is left as it is: its result is late."""
    add(store, "r", "http://a:80")
    with store.conn:
        assert not finish(store, "r", Move.SUCCEED)
    assert outbox.get(store.conn, "r").status is DeliveryState.PENDING
    claim(store)
    with store.conn:
        assert finish(store, "r", Move.RETRY, NOW + 5 * SECOND, "HTTP 503")
    row = outbox.get(store.conn, "r")
    assert (row.status, row.next_attempt_us, row.attempts, row.lease_until_us) == (
        DeliveryState.PENDING,
        NOW + 5 * SECOND,
        1,
        None,
    )
    assert outbox.next_due_us(store.conn, after_us=NOW) == NOW + 5 * SECOND
    claim(store, NOW + 5 * SECOND)
    with store.conn:
        assert finish(store, "r", Move.SUCCEED, NOW + 6 * SECOND)
        assert not finish(store, "r", Move.DIE, NOW + 7 * SECOND, "HTTP 410")
    row = outbox.get(store.conn, "r")
    assert (row.status, row.attempts, row.last_error) == (DeliveryState.DELIVERED, 2, None)
    with pytest.raises(IllegalMove, match="it is final"):
        outbox.revive(store.conn, "r", NOW)
    with pytest.raises(outbox.UnknownDelivery):
        outbox.revive(store.conn, "nope", NOW)


FINISHES = [
    (Move.SUCCEED, None, 200, None),
    (Move.RETRY, "HTTP 503", 503, "HTTP 503"),
    (Move.DIE, "HTTP 404: not retried", 404, "HTTP 404: not retried"),
]


EXPECTED = {
    Move.SUCCEED: (DeliveryState.DELIVERED, None),
    Move.RETRY: (DeliveryState.PENDING, "HTTP 503"),
    Move.DIE: (DeliveryState.DEAD, "HTTP 404: not retried"),
}


@pytest.mark.parametrize(("move", "reason", "status", "error"), FINISHES)
def test_finish_counts_the_attempt_keeps_it_and_moves_the_row(
    store: Store, move: Move, reason: str | None, status: int, error: str | None
) -> None:
    """The sender's one-statement result: the lease cleared, the attempt counted and kept,
    the row moved with its time (finished, or due again) and its last error."""
    add(store, "one", "http://a:80")
    [row] = claim(store)
    at = NOW + 7 * SECOND
    with store.conn:
        assert outbox.finish(
            store.conn,
            "one",
            row.lease_until_us,
            move,
            at_us=at,
            reason=reason,
            attempted_us=NOW + 1,
            latency_us=900,
            status_code=status,
            error=error,
        )
    one = outbox.get(store.conn, "one")
    assert (one.status, one.last_error) == EXPECTED[move]
    assert (one.attempts, one.lease_until_us) == (1, None)
    if move is Move.RETRY:
        assert (one.next_attempt_us, one.finished_us) == (at, None)
    else:
        assert (one.next_attempt_us, one.finished_us) == (row.next_attempt_us, at)
    [attempt] = outbox.attempts(store.conn, "one")
    assert (attempt.attempted_us, attempt.latency_us, attempt.status_code, attempt.error) == (
        NOW + 1,
        900,
        status,
        error,
    )


def test_finish_writes_nothing_once_the_lease_is_not_held(store: Store) -> None:
    """A result that waited past its lease: the row was released, then claimed again."""
    add(store, "r", "http://a:80")
    [first] = claim(store)
    assert first.lease_until_us is not None
    with store.conn:
        outbox.release_leases(store.conn, first.lease_until_us)
    [second] = claim(store, first.lease_until_us)
    before = outbox.get(store.conn, "r"), outbox.attempts(store.conn, "r")
    with store.conn:
        ours = outbox.finish(
            store.conn,
            "r",
            first.lease_until_us,
            Move.SUCCEED,
            at_us=NOW,
            reason=None,
            attempted_us=NOW,
            latency_us=1,
            status_code=200,
            error=None,
        )
    assert not ours
    assert (outbox.get(store.conn, "r"), outbox.attempts(store.conn, "r")) == before
    assert outbox.get(store.conn, "r").lease_until_us == second.lease_until_us


def test_revive_gives_a_fresh_window(store: Store) -> None:
    add(store, "r", "http://a:80")
    claim(store)
    with store.conn:
        finish(store, "r", Move.DIE, reason="HTTP 400: not retried")
    later = NOW + 100 * SECOND
    with store.conn:
        outbox.revive(store.conn, "r", later)
    row = outbox.get(store.conn, "r")
    assert (row.status, row.attempts, row.window_start_us, row.next_attempt_us) == (
        DeliveryState.PENDING,
        0,
        later,
        later,
    )
    assert len(outbox.attempts(store.conn, "r")) == 1  # history is kept


def test_unknown_status_is_refused_by_the_converter(store: Store) -> None:
    add(store, "r", None)
    store.conn.execute("PRAGMA ignore_check_constraints = 1")
    store.conn.execute("UPDATE outbox SET status = 'lost' WHERE id = 'r'")
    with pytest.raises(ValueError, match="unknown status 'lost'"):
        outbox.get(store.conn, "r")


def test_prune_forgets_finished_rows_only(store: Store) -> None:
    for row_id in ("done", "dead", "waiting"):
        add(store, row_id, "http://a:80")
    claim(store)
    with store.conn:
        finish(store, "done", Move.SUCCEED)
        finish(store, "dead", Move.DIE, reason="HTTP 400")
        finish(store, "waiting", Move.RETRY, reason="HTTP 500")
        assert outbox.prune_finished(store.conn, NOW + 1) == 2
    assert [r.id for r in outbox.list_rows(store.conn)] == ["waiting"]
    assert outbox.attempts(store.conn, "done") == []


def test_ids_resolve_exactly_or_by_a_unique_prefix(store: Store) -> None:
    for row_id in ("0190aa-1", "0190aa-10", "0190ab-2"):
        add(store, row_id, None)
    assert outbox.resolve_id(store.conn, "0190ab") == "0190ab-2"
    assert outbox.resolve_id(store.conn, "0190aa-1") == "0190aa-1"  # exact, though a prefix
    assert outbox.resolve_id(store.conn, "0190aa-10") == "0190aa-10"
    with pytest.raises(outbox.AmbiguousDelivery) as ambiguous:
        outbox.resolve_id(store.conn, "0190a")
    assert ambiguous.value.candidates == ["0190aa-1", "0190aa-10", "0190ab-2"]
    assert "give more of the id" in str(ambiguous.value)
    with pytest.raises(outbox.UnknownDelivery, match="no delivery id starts with 'x'"):
        outbox.resolve_id(store.conn, "x")
    with pytest.raises(outbox.UnknownDelivery):
        outbox.resolve_id(store.conn, "")
    with pytest.raises(outbox.UnknownDelivery):
        outbox.resolve_id(store.conn, "0190a%")  # no pattern matching: % is a character


def test_a_cancelled_row_is_never_claimed_revived_or_hurried(store: Store) -> None:
    for row_id in ("waiting", "dead"):
        add(store, row_id, "http://a:80")
    add(store, "busy", "http://a:80", NOW + 1)  # not due yet for the first claim
    claim(store)
    with store.conn:
        assert {r.id for r in outbox.list_rows(store.conn, status=DeliveryState.IN_FLIGHT)} == {
            "waiting",
            "dead",
        }
        finish(store, "waiting", Move.RETRY, NOW + 3600 * SECOND, "HTTP 503")
        finish(store, "dead", Move.DIE, reason="HTTP 410")
        outbox.cancel(store.conn, "waiting", NOW + 1)
        outbox.cancel(store.conn, "dead", NOW + 2)
        for row_id in ("waiting", "dead"):
            with pytest.raises(IllegalMove, match="cancelled"):
                outbox.revive(store.conn, row_id, NOW)
            with pytest.raises(IllegalMove, match="cancelled"):
                outbox.send_now(store.conn, row_id, NOW)
    cancelled = outbox.get(store.conn, "waiting")
    assert (cancelled.status, cancelled.finished_us) == (DeliveryState.CANCELLED, NOW + 1)
    assert cancelled.last_error == "cancelled by an operator"
    assert [r.id for r in claim(store, NOW + 7200 * SECOND)] == ["busy"]
    with store.conn, pytest.raises(IllegalMove, match="cannot cancel a delivery that is in_flight"):
        outbox.cancel(store.conn, "busy", NOW)
    with store.conn:  # finished rows, cancelled ones too, go with retention
        assert outbox.prune_finished(store.conn, NOW + 3) == 2


def test_send_now_makes_a_pending_row_due_at_once(store: Store) -> None:
    add(store, "later", "http://a:80")
    claim(store)
    with store.conn:
        finish(store, "later", Move.RETRY, NOW + 3600 * SECOND, "HTTP 503")
    assert claim(store, NOW + 10 * SECOND) == []
    with store.conn:
        outbox.send_now(store.conn, "later", NOW + 5 * SECOND)
    assert outbox.get(store.conn, "later").attempts == 1  # the schedule is not reset
    assert [r.id for r in claim(store, NOW + 10 * SECOND)] == ["later"]
    with store.conn, pytest.raises(IllegalMove, match="in_flight"):
        outbox.send_now(store.conn, "later", NOW)


# --- the commands --------------------------------------------------------------------------


def run(db: Path, *argv: str, **fields: object) -> tuple[int, str, str]:
    namespace = argparse.Namespace(
        db=str(db), config=None, status=None, limit=50, id=None, dead=False
    )
    namespace.outbox_command = argv[0]
    for key, value in fields.items():
        setattr(namespace, key, value)
    out, err = io.StringIO(), io.StringIO()
    code = outbox_command(namespace, out, err)
    return code, out.getvalue(), err.getvalue()


def test_list_and_retry_commands(store: Store, tmp_path: Path) -> None:
    db = tmp_path / "trigd.db"
    add(store, "ok", "http://a:80", NOW)
    add(store, "broken", "http://b:80", NOW + 1)
    add(store, "broken2", "http://b:80", NOW + 2)
    claim(store, NOW + 5)
    with store.conn:
        finish(store, "ok", Move.SUCCEED)
        finish(store, "broken", Move.DIE, reason="HTTP 410: not retried")
        finish(store, "broken2", Move.DIE, reason="HTTP 404: not retried")

    code, out, _ = run(db, "list", status="dead")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("id\tstatus")
    assert [line.split("\t")[:2] for line in lines[1:]] == [["broken2", "dead"], ["broken", "dead"]]
    assert lines[2].endswith("HTTP 410: not retried")
    assert "http://b:80" in lines[2]

    code, out, _ = run(db, "list", limit=1)
    assert len(out.splitlines()) == 2

    code, _, err = run(db, "retry", id="ok")
    assert code == 1
    assert "trigd outbox retry: ok is delivered: only dead deliveries" in err
    code, _, err = run(db, "retry", id="missing")
    assert (code, err.strip()) == (1, "trigd outbox retry: no delivery id starts with 'missing'")

    code, out, _ = run(db, "retry", id="broken")
    assert code == 0
    assert outbox.get(store.conn, "broken").status is DeliveryState.PENDING
    code, out, _ = run(db, "retry", dead=True)
    assert (code, out.strip()) == (0, "1 dead deliveries put back to pending")
    assert outbox.get(store.conn, "broken2").status is DeliveryState.PENDING


def test_commands_report_a_missing_database(tmp_path: Path) -> None:
    code, _, err = run(tmp_path / "absent.db", "list")
    assert code == 1
    assert "no such database" in err
    code, _, err = run(tmp_path / "absent.db", "retry", dead=True)
    assert code == 1
    assert "no such database" in err
    assert not (tmp_path / "absent.db").exists()


def test_list_needs_a_positive_limit(tmp_path: Path) -> None:
    code, _, err = run(tmp_path / "x.db", "list", limit=0)
    assert code == 2
    assert "--limit" in err


def test_list_is_read_only(store: Store, tmp_path: Path) -> None:
    add(store, "r", None)
    code, out, _ = run(tmp_path / "trigd.db", "list", status="pending")
    assert code == 0
    assert "r\tpending\t0" in out
