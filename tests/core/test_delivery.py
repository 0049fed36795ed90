"""The delivery state table, retry policy and slot sharing across endpoints (pure), and
the outbox store driven by the same table as a hypothesis state machine."""

from __future__ import annotations

import email.utils
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from daemon.core.action_models import CallWebhook
from daemon.core.clock import to_us
from daemon.core.delivery import (
    TRANSITIONS,
    AttemptOutcome,
    Dead,
    Delivered,
    DeliveryState,
    Endpoint,
    Endpoints,
    GiveWay,
    IllegalMove,
    Move,
    RetryAt,
    Slots,
    Window,
    WindowPolicy,
    advance,
    backoff,
    decide,
    endpoint_answered,
    next_window,
    parse_retry_after,
    renders_inline,
    share_slots,
    sources,
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
    assert not any(s is DeliveryState.CANCELLED for s, _ in TRANSITIONS)


def test_only_pending_and_dead_deliveries_can_be_cancelled() -> None:
    assert sources(Move.CANCEL) == {DeliveryState.PENDING, DeliveryState.DEAD}
    assert advance(DeliveryState.DEAD, Move.CANCEL) is DeliveryState.CANCELLED
    with pytest.raises(IllegalMove, match="cannot cancel a delivery that is in_flight"):
        advance(DeliveryState.IN_FLIGHT, Move.CANCEL)
    with pytest.raises(IllegalMove, match="it is final"):
        advance(DeliveryState.CANCELLED, Move.REVIVE)


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


# --- sharing the slots across endpoints ---------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "answered"),
    [
        (AttemptOutcome(status_code=200), True),
        (AttemptOutcome(status_code=204), True),
        (AttemptOutcome(status_code=302), True),  # a redirect is an answer (not followed)
        (AttemptOutcome(status_code=404), True),
        (AttemptOutcome(status_code=408), False),
        (AttemptOutcome(status_code=429), False),
        (AttemptOutcome(status_code=500), False),
        (AttemptOutcome(status_code=503), False),
        (AttemptOutcome(error="Webhook call failed: timed out after 15s"), False),
        (AttemptOutcome(error="Webhook call failed: ConnectError()"), False),
    ],
)
def test_an_endpoint_is_failing_after_what_would_be_retried(
    outcome: AttemptOutcome, answered: bool
) -> None:
    assert endpoint_answered(outcome) is answered


def test_the_book_tracks_slots_failing_and_trusted_endpoints() -> None:
    book = Endpoints(concurrency=4, per_endpoint=2, probes=1, failing=["http://old:80"])
    book.started(["http://a:80", "http://old:80"])
    assert not book.finished("http://a:80", True)  # it answers: trusted (was not failing)
    book.started(["http://a:80", "http://a:80"])
    slots = book.slots()
    assert (slots.free, slots.probes_free, book.in_flight) == (1, 0, 3)
    assert slots.trusted == {None, "http://a:80"}
    assert slots.room("http://a:80") == 0
    assert slots.room("http://old:80") == 0  # failing: one at a time, and no probe left
    assert slots.untrusted_free == 2  # concurrency - 1, less the probe in flight
    assert slots.room("http://new:80") == 2
    assert slots.turns == {"http://a:80": 4, "http://old:80": 2}

    assert book.finished("http://a:80", False)  # a timeout: now failing...
    assert book.failing == {"http://a:80", "http://old:80"}
    assert book.slots().room("http://a:80") == 0  # ...with one still in flight
    assert not book.finished("http://a:80", None)  # never reached it: says nothing
    assert not book.finished("http://old:80", False)  # still failing: no change
    slots = book.slots()
    assert (slots.free, slots.probes_free, slots.untrusted_free) == (4, 1, 3)
    assert slots.room("http://a:80") == 1
    book.started(["http://a:80"])
    assert book.finished("http://a:80", True)  # it answers: trusted again
    assert book.failing == {"http://old:80"}
    assert book.slots().room("http://a:80") == 2


def test_endpoints_not_answering_leave_a_slot_to_those_that_do() -> None:
    """New endpoints that turn out dead hang until their first timeout: together with
    failing ones they hold at most concurrency - 1 slots."""
    book = Endpoints(concurrency=4, per_endpoint=2, probes=1)
    book.started(["http://ok:80"])
    book.finished("http://ok:80", True)
    due: dict[Endpoint, list[str]] = {
        f"http://new{i}:80": [f"new{i}-{n}" for n in range(2)] for i in range(3)
    }
    due["http://ok:80"] = ["ok-0", "ok-1"]
    book.started(["http://new0:80", "http://new1:80"])  # hanging, not failing yet
    chosen = share_slots(due, book.slots())
    assert chosen == ["new2-0", "ok-0"]
    book.started(["http://new2:80", "http://ok:80"])
    assert book.slots().untrusted_free == 0
    assert share_slots(due, book.slots()) == []  # full; and when ok's slot frees:
    book.finished("http://ok:80", True)
    assert share_slots(due, book.slots()) == ["ok-0"]


def test_round_robin_takes_turns_and_failing_endpoints_wait_for_a_probe_slot() -> None:
    due: dict[Endpoint, list[str]] = {
        "http://dead:80": ["d1", "d2", "d3"],
        "http://a:80": ["a1", "a2", "a3"],
        "http://b:80": ["b1", "b2", "b3"],
        None: ["n1"],
    }
    plain = Slots(free=6, per_endpoint=2)
    assert share_slots(due, plain) == ["d1", "a1", "b1", "n1", "d2", "a2"]
    failing = Slots(
        free=6,
        per_endpoint=2,
        probes_free=1,
        failing=frozenset({"http://dead:80"}),
        turns={"http://a:80": 7, "http://b:80": 3, "http://dead:80": 1},
    )
    # never served first (None), then the one served longest ago; dead gets one probe
    assert share_slots(due, failing) == ["n1", "d1", "b1", "a1", "b2", "a2"]
    no_probe = attrs.evolve(failing, probes_free=0)
    assert share_slots(due, no_probe) == ["n1", "b1", "a1", "b2", "a2"]


@st.composite
def shares(draw: st.DrawFn) -> tuple[dict[Endpoint, list[str]], Slots]:
    per_endpoint = draw(st.integers(1, 4))
    count = draw(st.integers(0, 30))
    endpoints: list[Endpoint] = [None, *(f"http://h{i}:80" for i in range(count))]
    due: dict[Endpoint, list[str]] = {}
    busy: dict[Endpoint, int] = {}
    failing: set[Endpoint] = set()
    turns: dict[Endpoint, int] = {}
    for position, endpoint in enumerate(endpoints):
        rows = draw(st.integers(0, 5))
        if rows:
            due[endpoint] = [f"{endpoint}#{n}" for n in range(rows)]
        is_failing = endpoint is not None and draw(st.booleans())
        if is_failing:
            failing.add(endpoint)
        busy[endpoint] = draw(st.integers(0, per_endpoint))  # failing while busy: may be > 1
        if draw(st.booleans()):
            turns[endpoint] = position * 7 % 31
    slots = Slots(
        free=draw(st.integers(0, 20)),
        per_endpoint=per_endpoint,
        probes_free=draw(st.integers(-1, 4)),
        busy=busy,
        failing=frozenset(failing),
        turns=turns,
    )
    return due, slots


@given(shares())
@settings(max_examples=300, deadline=None)
def test_sharing_is_bounded_work_conserving_and_round_robin(
    share: tuple[dict[Endpoint, list[str]], Slots],
) -> None:
    due, slots = share
    chosen = share_slots(due, slots)
    owner = {row: endpoint for endpoint, rows in due.items() for row in rows}
    got: Counter[Endpoint] = Counter(owner[row] for row in chosen)
    assert len(chosen) == len(set(chosen)) <= max(0, slots.free)
    for endpoint, n in got.items():
        assert [r for r in chosen if owner[r] == endpoint] == due[endpoint][:n]  # oldest first
        assert n <= slots.room(endpoint)
    probes = sum(n for endpoint, n in got.items() if endpoint in slots.failing)
    assert probes <= max(0, slots.probes_free)

    def capped(endpoint: Endpoint) -> bool:
        return got[endpoint] >= min(len(due[endpoint]), slots.room(endpoint))

    probes_left = probes < slots.probes_free
    if len(chosen) < slots.free:  # slots left over: everyone got all it could
        assert all(capped(e) or (e in slots.failing and not probes_left) for e in due)
    working = [e for e in due if e not in slots.failing]
    for a in working:
        for b in working:  # round-robin: nobody gets two more while another waits
            assert got[a] <= got[b] + 1 or capped(b)

    def key(endpoint: Endpoint) -> tuple[int, int]:
        return slots.turns.get(endpoint, -1), list(due).index(endpoint)

    for waiting in working:  # who waits, waits for those whose turn came first
        if got[waiting] == 0 and not capped(waiting):
            assert all(key(e) < key(waiting) for e in got)


@given(
    concurrency=st.integers(2, 16),
    dead=st.integers(0, 300),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_a_working_endpoint_gets_a_slot_every_round_however_many_endpoints_fail(
    concurrency: int, dead: int, data: st.DataObject
) -> None:
    """Dead endpoints (already failing) whose attempts hang, or fail now and then, beside
    one working endpoint whose attempts answer before the next claim: the working one is
    served in every claim round, and failing ones never hold more than the probe slots."""
    probes = data.draw(st.integers(1, concurrency - 1), label="probes")
    per_endpoint = data.draw(st.integers(1, concurrency), label="per_endpoint")
    healthy = "http://healthy:80"
    failing = [f"http://dead{i}:80" for i in range(dead)]
    book = Endpoints(
        concurrency=concurrency, per_endpoint=per_endpoint, probes=probes, failing=failing
    )
    book.started([healthy])
    book.finished(healthy, True)  # a working endpoint: it has answered
    hanging: list[Endpoint] = []
    for _ in range(20):
        due: dict[Endpoint, list[str]] = {e: [f"{e}#{n}" for n in range(5)] for e in failing}
        due[healthy] = [f"{healthy}#{n}" for n in range(5)]
        chosen = share_slots(due, book.slots())
        picked = [row.split("#")[0] for row in chosen]
        book.started(picked)
        assert healthy in picked
        assert book.in_flight <= concurrency
        assert book.probes_in_flight() <= probes
        assert book.untrusted_in_flight() <= concurrency - 1
        for endpoint in picked:
            if endpoint == healthy:
                assert not book.finished(healthy, True)
            else:
                hanging.append(endpoint)
        ending = data.draw(st.integers(0, len(hanging)), label="probes ending")
        for probed in hanging[:ending]:
            book.finished(probed, False)
        del hanging[:ending]


# --- giving way to acks while clients send events ----------------------------------------


def test_the_cap_holds_while_an_evaluator_batch_began_within_quiet_after() -> None:
    give_way = GiveWay(while_ingesting=2, quiet_after=0.1)
    assert give_way.cap(None, now=50.0) is None  # no batch yet
    assert give_way.cap(10.0, now=10.0) == 2
    assert give_way.cap(10.0, now=10.099) == 2
    assert give_way.quiet_at(10.0) == pytest.approx(10.1)
    assert give_way.cap(10.0, now=10.1) is None  # quiet: the windows are their own again
    assert give_way.quiet_at(None) is None


def widened(book: Endpoints, endpoint: Endpoint, answers: int) -> None:
    """`answers` fast answers in a row: the endpoint's window grows by one each."""
    for _ in range(answers):
        book.started([endpoint])
        book.finished(endpoint, True, latency=FAST, now=AT)


def test_under_the_cap_a_fast_endpoints_window_is_no_wider_than_the_cap() -> None:
    """Its window has grown to 6: while clients send events it gets 2 attempts in flight,
    and all 6 once the cap lifts."""
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, window=WINDOW)
    fast: Endpoint = "http://fast:80"
    widened(book, fast, 4)
    assert book.window(fast) == 6
    due = {fast: [(fast, n) for n in range(8)]}
    chosen = share_slots(due, book.slots(cap=2))
    assert len(chosen) == 2
    book.started(endpoint for endpoint, _ in chosen)
    assert share_slots(due, book.slots(cap=2)) == []
    assert book.held_back(2)  # quiet would give it more: look again then
    assert len(share_slots(due, book.slots())) == 4


def test_a_slow_endpoint_never_holds_the_slots_of_another_under_the_cap() -> None:
    """Two attempts hang at a slow endpoint that answers (trusted): another endpoint still
    gets its own attempts while clients send events, as it does without the cap."""
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, window=WINDOW)
    slow: Endpoint = "http://slow:80"
    other: Endpoint = "http://other:80"
    for endpoint in (slow, other):
        book.started([endpoint])
        book.finished(endpoint, True, latency=timedelta(seconds=5), now=AT)
    book.started([slow, slow])  # in flight for seconds
    due = {slow: [(slow, 2)], other: [(other, n) for n in range(3)]}
    assert share_slots(due, book.slots(cap=2)) == [(other, 0), (other, 1)]
    assert not book.held_back(2)  # nobody's window is wider than the cap


def test_the_cap_leaves_in_flight_attempts_alone() -> None:
    """Six in flight, claimed while ingest was quiet: none taken back, none added to that
    endpoint until it is below the cap; the others keep their slots."""
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, window=WINDOW)
    fast: Endpoint = "http://fast:80"
    widened(book, fast, 4)
    book.started([fast] * 6)
    due: dict[Endpoint, list[tuple[Endpoint, int]]] = {
        fast: [(fast, 0)],
        "http://b:80": [("http://b:80", 0)],
    }
    assert share_slots(due, book.slots(cap=2)) == [("http://b:80", 0)]
    for _ in range(5):
        book.finished(fast, True, latency=FAST, now=AT)
    assert share_slots(due, book.slots(cap=2)) == [("http://b:80", 0), (fast, 0)]


def test_held_back_only_when_the_cap_keeps_an_endpoint_below_its_window() -> None:
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, window=WINDOW)
    fast: Endpoint = "http://fast:80"
    book.started([fast, fast])
    assert not book.held_back(2)  # its window is 2 anyway
    assert not book.held_back(None)
    for _ in range(2):
        book.finished(fast, True, latency=FAST, now=AT)
    book.started([fast, fast])  # window 4 now, 2 in flight
    assert book.held_back(2)
    assert not book.held_back(3)  # below the cap: the claim took what was due


def test_a_failing_endpoints_probe_takes_its_turn_under_a_cap_of_one() -> None:
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, failing=["http://dead:80"])
    book.started(["http://ok:80"])
    book.finished("http://ok:80", True)
    due: dict[Endpoint, list[str]] = {
        "http://ok:80": ["ok#0", "ok#1"],
        "http://dead:80": ["dead#0"],
    }
    assert share_slots(due, book.slots(cap=1)) == ["dead#0", "ok#0"]  # never served: first


@given(
    concurrency=st.integers(1, 12),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_the_cap_bounds_each_endpoint_and_takes_nothing_from_the_others(
    concurrency: int, data: st.DataObject
) -> None:
    """Claims under a cap (ingest busy) or not (quiet), answers fast or slow, attempts
    ending at random: a capped claim never brings an endpoint above the cap, and takes
    for the other endpoints exactly what the same claim takes without the cap (the cap
    only trims the endpoints it bounds); the total never passes `concurrency`."""
    cap = data.draw(st.integers(1, concurrency), label="cap")
    count = data.draw(st.integers(1, 5), label="endpoints")
    names: list[Endpoint] = [None, *(f"http://e{i}:80" for i in range(count))]
    per_endpoint = data.draw(st.integers(1, concurrency), label="per_endpoint")
    book = Endpoints(
        concurrency=concurrency,
        per_endpoint=per_endpoint,
        probes=data.draw(st.integers(1, max(1, concurrency - 1)), label="probes"),
        failing=data.draw(st.sets(st.sampled_from(names[1:])), label="failing"),
        window=WindowPolicy(per_endpoint, max(per_endpoint, concurrency - 1), WINDOW.fast),
    )
    due = {e: [(e, n) for n in range(concurrency)] for e in names}
    in_flight: list[Endpoint] = []
    for _ in range(data.draw(st.integers(1, 30), label="claims")):
        busy = data.draw(st.booleans(), label="busy")
        before = Counter(in_flight)
        uncapped = Counter(e for e, _ in share_slots(due, book.slots()))
        picked = [e for e, _ in share_slots(due, book.slots(cap if busy else None))]
        book.started(picked)
        in_flight += picked
        assert book.in_flight <= concurrency
        if busy:
            after = Counter(in_flight)
            for endpoint in names:
                assert after[endpoint] <= max(cap, before[endpoint])
            bounded = {e for e in names if uncapped[e] + before[e] > cap}
            if not bounded:
                assert Counter(picked) == uncapped
        ending = data.draw(st.integers(0, len(in_flight)), label="ending")
        for endpoint in in_flight[:ending]:  # answered (fast or slow), failed, never reached
            outcome = data.draw(st.sampled_from([None, True, False]), label="outcome")
            fast = data.draw(st.booleans(), label="fast")
            latency = FAST if fast else SLOW
            book.finished(endpoint, outcome, latency=None if outcome is None else latency, now=AT)
        del in_flight[:ending]


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

    def _finish(self, row_id: str, move: Move, at_us: int, reason: str | None) -> None:
        """The sender's result: it moves only a row in flight under its claim's lease, and
        any other row is left as it was."""
        expected = TRANSITIONS.get((self.model[row_id], move))
        before = outbox.get(self.conn, row_id)
        with self.conn:
            moved = outbox.finish(
                self.conn,
                row_id,
                before.lease_until_us,
                move,
                at_us=at_us,
                reason=reason,
                attempted_us=self.now_us,
                latency_us=1,
                status_code=None,
                error=reason,
            )
        assert moved == (expected is not None)
        if expected is None:
            assert outbox.get(self.conn, row_id) == before
        else:
            self.model[row_id] = expected

    @rule(row_id=rows)
    def succeed(self, row_id: str) -> None:
        self._finish(row_id, Move.SUCCEED, self.now_us, None)

    @rule(row_id=rows, delay=st.integers(0, 10_000_000))
    def retry(self, row_id: str, delay: int) -> None:
        self._finish(row_id, Move.RETRY, self.now_us + delay, "HTTP 500")

    @rule(row_id=rows)
    def die(self, row_id: str) -> None:
        self._finish(row_id, Move.DIE, self.now_us, "HTTP 400")

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


# --- the per-endpoint window ----------------------------------------------------------------

WINDOW = WindowPolicy(floor=2, ceiling=6, fast=timedelta(milliseconds=250))
AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
FAST = timedelta(milliseconds=5)
SLOW = timedelta(seconds=1)


def test_fast_answers_widen_the_window_one_by_one_up_to_the_ceiling() -> None:
    window = Window(2)
    sizes = []
    for _ in range(6):
        window = next_window(window, WINDOW, answered=True, latency=FAST, now=AT)
        sizes.append(window.size)
    assert sizes == [3, 4, 5, 6, 6, 6]


def test_a_slow_answer_or_a_failure_halves_it_once_per_fast_answer_period() -> None:
    window = Window(6)
    window = next_window(window, WINDOW, answered=True, latency=SLOW, now=AT)
    assert window == Window(3, AT)
    # the other attempts of the same slowdown end within the period: no second halving
    later = AT + timedelta(milliseconds=100)
    assert next_window(window, WINDOW, answered=False, latency=None, now=later) == window
    after = AT + timedelta(milliseconds=250)
    assert next_window(window, WINDOW, answered=False, latency=None, now=after) == Window(2, after)
    # never under the floor
    assert next_window(Window(2), WINDOW, answered=False, latency=None, now=AT).size == 2


def test_an_attempt_that_never_reached_the_endpoint_leaves_the_window() -> None:
    window = Window(4, AT)
    assert next_window(window, WINDOW, answered=None, latency=None, now=AT) == window


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([True, False, None]),
            st.integers(0, 2_000),  # latency, ms
            st.integers(0, 1_000),  # ms since the previous attempt ended
        ),
        max_size=40,
    ),
    start=st.integers(0, 10),
)
def test_the_window_stays_between_floor_and_ceiling(
    steps: list[tuple[bool | None, int, int]], start: int
) -> None:
    window, now = Window(start), AT
    for answered, latency_ms, gap_ms in steps:
        now += timedelta(milliseconds=gap_ms)
        window = next_window(
            window, WINDOW, answered=answered, latency=timedelta(milliseconds=latency_ms), now=now
        )
        assert WINDOW.floor <= window.size <= WINDOW.ceiling


def test_endpoints_hand_a_fast_endpoint_the_slots_of_its_window() -> None:
    book = Endpoints(concurrency=8, per_endpoint=2, probes=2, window=WINDOW)
    fast = "http://fast:80"
    book.started([fast, fast])
    assert book.slots().room(fast) == 0  # its window of 2 is full
    book.finished(fast, True, latency=FAST, now=AT)
    book.finished(fast, True, latency=FAST, now=AT)
    assert book.window(fast) == 4
    assert book.slots().room(fast) == 4
    book.started([fast] * 4)
    book.finished(fast, False, latency=None, now=AT)  # a timeout: failing, window halved
    assert book.window(fast) == 2
    assert fast in book.failing


def test_a_request_renders_inline_unless_a_statement_or_a_file_read_could_make_it_slow() -> None:
    def webhook(**fields: object) -> CallWebhook:
        return CallWebhook.model_validate({"type": "call-webhook", "url": "http://h/", **fields})

    assert renders_inline(webhook())
    assert renders_inline(webhook(payload='{"n": "{{ event.id }}"}', secret="env:HOOK_SECRET"))
    assert renders_inline(webhook(headers={"X-Token": "literal:file:/not/a/reference"}))
    assert not renders_inline(webhook(payload="{% for x in range(9) %}{{ x }}{% endfor %}"))
    assert not renders_inline(webhook(secret="file:/etc/trigd/hook.key"))
    assert not renders_inline(webhook(headers={"Authorization": "credential:token"}))
