"""The delivery state table and retry policy (pure), and the outbox store driven by the
same table as a hypothesis state machine."""

from __future__ import annotations

import email.utils
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from daemon.clock import to_us
from daemon.delivery import (
    TRANSITIONS,
    AttemptOutcome,
    Dead,
    Delivered,
    DeliveryState,
    IllegalMove,
    Move,
    RetryAt,
    advance,
    backoff,
    decide,
    parse_retry_after,
)
from store import outbox
from store.db import Store

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
MAX_AGE = timedelta(hours=72)


def half() -> float:
    return 0.5


def test_every_move_has_one_target_and_final_states_stay_final() -> None:
    for state in DeliveryState:
        for move in Move:
            if (state, move) in TRANSITIONS:
                assert advance(state, move) is TRANSITIONS[(state, move)]
            else:
                with pytest.raises(IllegalMove, match=f"cannot {move.value}"):
                    advance(state, move)
    assert not any(s is DeliveryState.DELIVERED for s, _ in TRANSITIONS)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [
        (1, timedelta(seconds=5)),
        (2, timedelta(minutes=5)),
        (3, timedelta(minutes=30)),
        (4, timedelta(hours=2)),
        (5, timedelta(hours=5)),
        (6, timedelta(hours=10)),
        (9, timedelta(hours=10)),
    ],
)
def test_backoff_schedule(failures: int, expected: timedelta) -> None:
    assert backoff(failures, half) == expected
    assert backoff(failures, lambda: 0.0) == expected * 0.8
    assert backoff(failures, lambda: 0.999999) < expected * 1.2


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    outcome = AttemptOutcome(status_code=status)
    decision = decide(outcome, failures=1, created=NOW, now=NOW, max_age=MAX_AGE, random=half)
    assert decision == Delivered()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422, 301, 302])
def test_other_statuses_are_dead_at_once(status: int) -> None:
    outcome = AttemptOutcome(status_code=status)
    decision = decide(outcome, failures=1, created=NOW, now=NOW, max_age=MAX_AGE, random=half)
    assert isinstance(decision, Dead)
    assert decision.reason.startswith(f"HTTP {status}")


@pytest.mark.parametrize(
    "outcome",
    [
        AttemptOutcome(status_code=500),
        AttemptOutcome(status_code=503),
        AttemptOutcome(status_code=408),
        AttemptOutcome(status_code=429),
        AttemptOutcome(error="Webhook call failed: ConnectError('refused')"),
    ],
)
def test_transient_failures_retry_with_backoff(outcome: AttemptOutcome) -> None:
    decision = decide(outcome, failures=2, created=NOW, now=NOW, max_age=MAX_AGE, random=half)
    assert decision == RetryAt(NOW + timedelta(minutes=5), decision.reason)  # type: ignore[union-attr]


def test_retry_is_pulled_in_to_the_deadline_then_dead() -> None:
    outcome = AttemptOutcome(status_code=500)
    created = NOW - MAX_AGE + timedelta(seconds=30)
    decision = decide(outcome, failures=6, created=created, now=NOW, max_age=MAX_AGE, random=half)
    assert decision == RetryAt(created + MAX_AGE, "HTTP 500")
    later = created + MAX_AGE
    decision = decide(outcome, failures=7, created=created, now=later, max_age=MAX_AGE, random=half)
    assert decision == Dead("HTTP 500; gave up after 7 attempts in 3d")


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("120", NOW) == timedelta(seconds=120)
    date = email.utils.format_datetime(NOW + timedelta(minutes=3), usegmt=True)
    assert parse_retry_after(date, NOW) == timedelta(minutes=3)
    past = email.utils.format_datetime(NOW - timedelta(minutes=3), usegmt=True)
    assert parse_retry_after(past, NOW) == timedelta(0)
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("999999999", NOW) == timedelta(hours=24)
    outcome = AttemptOutcome(status_code=429, retry_after="42")
    decision = decide(outcome, failures=1, created=NOW, now=NOW, max_age=MAX_AGE, random=half)
    assert decision == RetryAt(NOW + timedelta(seconds=42), "HTTP 429")


def test_an_outcome_is_a_status_or_an_error() -> None:
    with pytest.raises(ValueError, match="either"):
        AttemptOutcome()
    with pytest.raises(ValueError, match="either"):
        AttemptOutcome(status_code=500, error="boom")


# --- the outbox store as a state machine ---------------------------------------------------


class OutboxMachine(RuleBasedStateMachine):
    """Random claims, outcomes, lease expiries and revivals against the real store; the
    model is the state table, and every row must always be where the table says."""

    rows = Bundle("rows")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.store = Store.open(Path(self.tmp.name) / "t.db", synchronous="normal")
        self.conn = self.store.conn
        self.model: dict[str, DeliveryState] = {}
        self.now_us = to_us(NOW)
        self.count = 0

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    def _apply(self, row_id: str, move: Move, action: object) -> None:
        expected = TRANSITIONS.get((self.model[row_id], move))
        if expected is None:
            with pytest.raises(IllegalMove), self.conn:
                action()  # type: ignore[operator]
        else:
            with self.conn:
                action()  # type: ignore[operator]
            self.model[row_id] = expected

    @rule(target=rows, endpoint=st.sampled_from([None, "http://a:80", "http://b:80"]))
    def enqueue(self, endpoint: str | None) -> str:
        self.count += 1
        row_id = f"row-{self.count}"
        with self.conn:
            outbox.enqueue(
                self.conn,
                [
                    outbox.NewOutboxRow(
                        row_id, "auto", 0, "call-webhook", endpoint, "{}", self.now_us
                    )
                ],
            )
        self.model[row_id] = DeliveryState.PENDING
        return row_id

    @rule(limit=st.integers(1, 4), per_endpoint=st.integers(1, 3))
    def claim(self, limit: int, per_endpoint: int) -> None:
        with self.conn:
            claimed = outbox.claim(
                self.conn,
                self.now_us,
                self.now_us + 60_000_000,
                limit=limit,
                per_endpoint=per_endpoint,
            )
        assert len(claimed) <= limit
        per: dict[str | None, int] = {}
        for row in claimed:
            assert self.model[row.id] is DeliveryState.PENDING
            assert row.status is DeliveryState.IN_FLIGHT
            self.model[row.id] = DeliveryState.IN_FLIGHT
            per[row.endpoint] = per.get(row.endpoint, 0) + 1
        assert all(n <= per_endpoint for n in per.values())

    @rule(row_id=rows)
    def succeed(self, row_id: str) -> None:
        self._apply(
            row_id, Move.SUCCEED, lambda: outbox.mark_delivered(self.conn, row_id, self.now_us)
        )

    @rule(row_id=rows, delay=st.integers(0, 10_000_000))
    def retry(self, row_id: str, delay: int) -> None:
        self._apply(
            row_id,
            Move.RETRY,
            lambda: outbox.mark_retry(self.conn, row_id, self.now_us + delay, "HTTP 500"),
        )

    @rule(row_id=rows)
    def die(self, row_id: str) -> None:
        self._apply(
            row_id, Move.DIE, lambda: outbox.mark_dead(self.conn, row_id, self.now_us, "HTTP 400")
        )

    @rule(row_id=rows)
    def revive(self, row_id: str) -> None:
        self._apply(row_id, Move.REVIVE, lambda: outbox.revive(self.conn, row_id, self.now_us))

    @rule(step=st.integers(1, 120_000_000))
    def time_passes(self, step: int) -> None:
        self.now_us += step
        with self.conn:
            released = outbox.release_leases(self.conn, self.now_us)
        expired = [
            r.id
            for r in outbox.list_rows(self.conn, status=DeliveryState.IN_FLIGHT, limit=10_000)
            if r.lease_until_us is not None and r.lease_until_us <= self.now_us
        ]
        assert expired == []
        moved = 0
        for row_id, state in self.model.items():
            if (
                state is DeliveryState.IN_FLIGHT
                and outbox.get(self.conn, row_id).status is DeliveryState.PENDING
            ):
                self.model[row_id] = DeliveryState.PENDING
                moved += 1
        assert moved == released

    @invariant()
    def store_matches_model(self) -> None:
        for row_id, state in self.model.items():
            assert outbox.get(self.conn, row_id).status is state


OutboxMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOutboxMachine = OutboxMachine.TestCase
