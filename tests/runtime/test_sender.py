"""The sender against real HTTP receivers on 127.0.0.1 (docs/DELIVERY.md#outcomes-and-retries,
#action-events)."""

from __future__ import annotations

import email.utils
import json
import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing
from standardwebhooks.webhooks import Webhook

from daemon import __version__
from daemon.core.clock import from_us, to_us, wall_clock
from daemon.core.delivery import DeliveryState, Move, action_triggered_event_id
from daemon.core.events import ReceivedEvent
from daemon.engine.acting import endpoint_of
from daemon.runtime.evaluator import BatchProgress
from store import outbox
from store.db import Store
from store.events import peek_inbox
from tests.support.sender_harness import Harness, start, webhook
from tests.support.webhook_receiver import (
    T0,
    JumpingClock,
    Receiver,
    Reply,
    Request,
    answer,
    make_triggered,
    outbox_row,
    run_receiver,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "trigd.db", synchronous="normal")


def scripted(*replies: Reply) -> Any:
    """A handler answering with these replies in turn (the last one repeats)."""
    queue = list(replies)

    async def handler(request: Request) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


# --- success --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "verifier_key"),
    [
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("plain-shared-secret", b"plain-shared-secret"),
    ],
)
async def test_delivers_on_2xx_with_verifiable_signature(
    timed_nursery: trio.Nursery, store: Store, secret: str, verifier_key: str | bytes
) -> None:
    """Scenario 119 with trigd's inline webhook: the body, status and response headers
    (minus Prefect's redacted ones) are recorded in `prefect.automation.action.executed`."""
    reply = Reply(
        200,
        {
            "X-Request-Id": "r-1",
            "Authorization": "Bearer hidden",
            "Via": "1.1 proxy",
            "X-Forwarded-For": "10.0.0.1",
            "X-Prefect-Thing": "hidden",
        },
        b'{"ok": true}',
    )
    receiver = await timed_nursery.start(run_receiver, scripted(reply))
    harness = await start(timed_nursery, store, clock=wall_clock)
    triggered = webhook(receiver, headers={"X-Team": "ops"}, secret=secret)
    await harness.enqueue(triggered)

    request = await receiver.next_request()
    event = await harness.next_event()

    assert request.method == "POST"
    assert request.target == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"trigd/{__version__}"
    assert request.headers["x-team"] == "ops"
    assert request.headers["webhook-id"] == str(triggered.id)
    assert json.loads(request.body) == json.loads(triggered.redacted().model_dump_json())
    assert secret.encode() not in request.body
    Webhook(verifier_key).verify(request.body.decode(), request.headers)

    assert event.event == "prefect.automation.action.executed"
    assert event.follows == action_triggered_event_id(triggered.id)
    assert event.resource.root == {
        "prefect.resource.id": f"prefect.automation.{triggered.automation.id}",
        "prefect.resource.name": "pump pressure burst",
        "prefect.trigger-type": "event",
        "prefect.posture": "Reactive",
    }
    assert [r.root for r in event.related] == [
        {
            "prefect.resource.id": f"prefect.event.{triggered.automation_triggered_event_id}",
            "prefect.resource.role": "automation-triggered-event",
        },
        {
            "prefect.resource.id": f"prefect.event.{triggered.triggering_event.id}",  # type: ignore[union-attr]
            "prefect.resource.role": "triggering-event",
        },
    ]
    assert event.payload["action_index"] == 0
    assert event.payload["action_type"] == "call-webhook"
    assert event.payload["invocation"] == str(triggered.id)
    assert event.payload["status_code"] == 200
    assert event.payload["response_body"] == '{"ok": true}'
    headers = event.payload["response_headers"]
    assert headers["x-request-id"] == "r-1"
    assert not {"authorization", "via", "x-forwarded-for", "x-prefect-thing"} & set(headers)

    row = harness.row(triggered)
    assert row.status is DeliveryState.DELIVERED
    assert row.attempts == 1
    assert row.finished_us is not None
    [attempt] = harness.attempts(triggered)
    assert attempt.status_code == 200
    assert attempt.error is None
    assert attempt.latency_us is not None
    # the event is in the inbox, committed with the status change
    inbox = [ReceivedEvent.model_validate_json(e) for _, e in peek_inbox(store.conn, 10)]
    assert [e.id for e in inbox] == [event.id]


async def test_an_action_header_replaces_trigds_own_whatever_its_case(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(200))
    harness = await start(timed_nursery, store)
    own = {"content-type": "application/cloudevents+json", "USER-AGENT": "pump-box"}
    await harness.enqueue(webhook(receiver, headers=own))
    request = await receiver.next_request()
    await harness.next_event()
    assert request.headers["content-type"] == "application/cloudevents+json"  # not sent twice
    assert request.headers["user-agent"] == "pump-box"


async def test_the_client_adds_its_headers_and_keeps_no_cookie_jar(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    """Each request carries the client's own headers (docs/DELIVERY.md#the-request), and
    a cookie one endpoint's answer sets is never sent back with a later delivery."""
    cookie = Reply(200, {"Set-Cookie": "session=abc; Path=/"})
    receiver = await timed_nursery.start(run_receiver, scripted(cookie, Reply(200)))
    harness = await start(timed_nursery, store)
    await harness.enqueue(webhook(receiver))
    first = await receiver.next_request()
    await harness.next_event()
    await harness.enqueue(webhook(receiver))
    second = await receiver.next_request()
    await harness.next_event()
    for request in (first, second):
        assert request.headers["host"] == receiver.url().split("/")[2]
        assert request.headers["accept"] == "*/*"
        assert "gzip" in request.headers["accept-encoding"]
        assert request.headers["connection"] == "keep-alive"
        assert request.headers["content-length"] == str(len(request.body))
    assert "cookie" not in second.headers


async def test_no_signature_without_secret(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(204))
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    request = await receiver.next_request()
    await harness.next_event()
    assert request.headers["webhook-id"] == str(triggered.id)
    assert "webhook-timestamp" in request.headers
    assert "webhook-signature" not in request.headers


async def test_rendered_payload_is_the_body(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(200))
    harness = await start(timed_nursery, store)
    payload = (
        '{"text": "{{ automation.name }}: {{ event.resource.id }} '
        '{{ labels.prefect.resource.id }}"}'
    )
    triggered = webhook(receiver, payload=payload, method="PUT")
    await harness.enqueue(triggered)
    request = await receiver.next_request()
    assert request.method == "PUT"
    assert json.loads(request.body) == {"text": "pump pressure burst: pump.7 pump.7"}
    assert (await harness.next_event()).event == "prefect.automation.action.executed"


async def test_do_nothing_is_delivered_without_http(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    harness = await start(timed_nursery, store)
    triggered = make_triggered({"type": "do-nothing"})
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    assert event.payload == {
        "action_index": 0,
        "action_type": "do-nothing",
        "invocation": str(triggered.id),
    }
    assert harness.row(triggered).status is DeliveryState.DELIVERED


# --- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 408])
async def test_retries_server_errors_then_succeeds(
    timed_nursery: trio.Nursery, store: Store, status: int
) -> None:
    receiver = await timed_nursery.start(
        run_receiver, scripted(Reply(status), Reply(status), Reply(200))
    )
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    assert len(receiver.requests) == 3
    assert {r.headers["webhook-id"] for r in receiver.requests} == {str(triggered.id)}
    attempts = harness.attempts(triggered)
    assert [a.status_code for a in attempts] == [status, status, 200]
    assert [a.error for a in attempts] == [f"HTTP {status}", f"HTTP {status}", None]
    # backoff without jitter: 5 s, then 5 min
    assert [from_us(a.attempted_us) - T0 for a in attempts] == [
        timedelta(0),
        timedelta(seconds=5),
        timedelta(seconds=5, minutes=5),
    ]
    assert harness.row(triggered).status is DeliveryState.DELIVERED


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [
        ("7", timedelta(seconds=7)),
        (email.utils.format_datetime(T0 + timedelta(minutes=2), usegmt=True), timedelta(minutes=2)),
    ],
)
async def test_429_honours_retry_after(
    timed_nursery: trio.Nursery, store: Store, retry_after: str, wait: timedelta
) -> None:
    replies = scripted(Reply(429, {"Retry-After": retry_after}), Reply(200))
    receiver = await timed_nursery.start(run_receiver, replies)
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    await harness.next_event()
    attempts = harness.attempts(triggered)
    assert [a.status_code for a in attempts] == [429, 200]
    assert from_us(attempts[1].attempted_us) - from_us(attempts[0].attempted_us) == wait


async def test_timeout_is_retried(timed_nursery: trio.Nursery, store: Store) -> None:
    calls = 0

    async def handler(request: Request) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()
        return Reply(200)

    receiver = await timed_nursery.start(run_receiver, handler)
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver, timeout=0.3)
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    first, second = harness.attempts(triggered)
    assert first.status_code is None
    assert first.error is not None
    assert first.error.startswith("Webhook call failed: timed out after 0.3s")
    assert second.status_code == 200
    assert [r.headers["webhook-id"] for r in receiver.requests] == [str(triggered.id)] * 2


async def test_refused_connection_is_retried(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(
        lambda task_status: run_receiver(answer(200), listen=False, task_status=task_status)
    )
    clock = JumpingClock(auto=False)
    harness = await start(timed_nursery, store, clock=clock)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)

    due = await clock.next_sleep()
    assert due == T0 + timedelta(seconds=5)
    [refused] = harness.attempts(triggered)
    assert refused.status_code is None
    assert refused.error is not None
    assert "ConnectError" in refused.error
    row = harness.row(triggered)
    assert row.status is DeliveryState.PENDING
    assert row.next_attempt_us == to_us(due)
    assert row.last_error == refused.error

    receiver.start_listening()
    clock.advance_to(due)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    assert [a.status_code for a in harness.attempts(triggered)] == [None, 200]


# --- dead ---------------------------------------------------------------------------------


async def test_4xx_is_dead_at_once(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(run_receiver, scripted(Reply(400, body=b"bad field")))
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.failed"
    assert event.follows == action_triggered_event_id(triggered.id)
    assert event.payload["reason"] == "HTTP 400: not retried"
    assert event.payload["status_code"] == 400
    assert event.payload["response_body"] == "bad field"
    row = harness.row(triggered)
    assert row.status is DeliveryState.DEAD
    assert row.last_error == "HTTP 400: not retried"
    assert len(receiver.requests) == 1


async def test_dead_after_max_age(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(503))
    harness = await start(timed_nursery, store, max_age=timedelta(seconds=60))
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.failed"
    assert event.payload["reason"] == "HTTP 503; gave up after 3 attempts in 1m"
    attempts = harness.attempts(triggered)
    # 5 s backoff, then the 5 min wait is pulled in to the deadline
    assert [from_us(a.attempted_us) - T0 for a in attempts] == [
        timedelta(0),
        timedelta(seconds=5),
        timedelta(seconds=60),
    ]
    assert harness.row(triggered).status is DeliveryState.DEAD


async def test_template_error_is_dead(timed_nursery: trio.Nursery, store: Store) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(200))
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver, payload="{{ range(1000) | list }}")
    await harness.enqueue(triggered)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.failed"
    assert event.payload["reason"].startswith("Template rendering failed: OverflowError(")
    assert event.payload["template_source"] == "{{ range(1000) | list }}"
    assert receiver.requests == []
    assert harness.row(triggered).status is DeliveryState.DEAD


@pytest.mark.parametrize("document", ["not json", "[]", '{"automation": {"name": 1}}'])
async def test_a_document_that_does_not_parse_is_dead_and_the_rest_go_on(
    timed_nursery: trio.Nursery, store: Store, document: str
) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(200))
    harness = await start(timed_nursery, store)
    good = webhook(receiver)
    bad = outbox_row(good, created=harness.clock())._replace(id="bad", document=document)

    def write(conn: apsw.Connection) -> None:
        with conn:
            outbox.enqueue(conn, [bad])

    await harness.gateway.run(write)
    await harness.enqueue(good)
    assert (await harness.next_event()).event == "prefect.automation.action.executed"
    for _ in range(3):  # every task idle, and the store calls they made returned
        await trio.testing.wait_all_tasks_blocked()
        await harness.gateway.run(lambda conn: None)
    row = await harness.gateway.run(outbox.get, "bad")
    assert row.status is DeliveryState.DEAD
    assert row.last_error is not None
    assert row.last_error.startswith("invalid outbox document: ")
    assert len(receiver.requests) == 1


# --- fairness and crashes -------------------------------------------------------------------


async def test_slow_endpoint_does_not_hold_back_others(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    release = trio.Event()

    async def slow_handler(request: Request) -> Reply:
        await release.wait()
        return Reply(200)

    slow = await timed_nursery.start(run_receiver, slow_handler)
    fast = await timed_nursery.start(run_receiver, answer(200))
    harness = await start(timed_nursery, store, concurrency=4, per_endpoint_concurrency=2)
    slow_rows = [webhook(slow) for _ in range(4)]
    fast_rows = [webhook(fast) for _ in range(5)]
    await harness.enqueue(*slow_rows)
    await harness.enqueue(*fast_rows)

    done = {(await harness.next_event()).payload["invocation"] for _ in fast_rows}
    assert done == {str(t.id) for t in fast_rows}
    assert len(slow.requests) == 2  # the per-endpoint bound, while the fast ones went by
    assert harness.sender.in_flight == 2

    release.set()
    done = {(await harness.next_event()).payload["invocation"] for _ in slow_rows}
    assert done == {str(t.id) for t in slow_rows}


async def test_an_action_timeout_longer_than_the_lease_keeps_the_row_its_own(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    release = trio.Event()

    async def slow_handler(request: Request) -> Reply:
        await release.wait()
        return Reply(200)

    receiver = await timed_nursery.start(run_receiver, slow_handler)
    clock = JumpingClock(auto=False)
    harness = await start(timed_nursery, store, clock=clock, lease=timedelta(seconds=60))
    triggered = webhook(receiver, timeout=300)  # the action may take 5 minutes
    await harness.enqueue(triggered)
    await receiver.next_request()
    lease_until = harness.row(triggered).lease_until_us
    assert lease_until is not None
    assert lease_until >= to_us(T0 + timedelta(seconds=300))  # the attempt plus its commit

    clock.advance_to(T0 + timedelta(seconds=90))  # past the configured lease
    harness.sender.notify()  # a claim pass, which releases expired leases
    with trio.move_on_after(1):
        await receiver.next_request()
    assert len(receiver.requests) == 1  # not sent again beside the open request

    release.set()
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    assert harness.row(triggered).status is DeliveryState.DELIVERED
    assert [a.status_code for a in harness.attempts(triggered)] == [200]


async def test_row_left_in_flight_by_a_crash_is_sent_again(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    receiver = await timed_nursery.start(run_receiver, answer(200))
    triggered = webhook(receiver)
    with store.conn:
        outbox.enqueue(store.conn, [outbox_row(triggered)])
        [claimed] = outbox.claim(
            store.conn, to_us(T0), to_us(T0 + timedelta(seconds=60)), limit=1, per_endpoint=1
        )
    assert claimed.status is DeliveryState.IN_FLIGHT  # ... and then the process died

    harness = await start(timed_nursery, store)
    event = await harness.next_event()
    assert event.event == "prefect.automation.action.executed"
    [request] = receiver.requests
    assert request.headers["webhook-id"] == str(triggered.id)
    attempts = harness.attempts(triggered)
    assert [a.error for a in attempts] == [outbox.LEASE_EXPIRED_ERROR, None]
    assert harness.row(triggered).attempts == 2


async def hang(request: Request) -> Reply:
    """An endpoint that accepts a request and never answers."""
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_failing_endpoints_leave_slots_to_a_healthy_one(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    """More dead endpoints than slots, each with a backlog older than the healthy
    endpoint's rows: the healthy rows are delivered while the dead backlog still waits,
    instead of after every dead row has held a slot for its timeout."""
    dead = [await timed_nursery.start(run_receiver, hang) for _ in range(6)]
    healthy = await timed_nursery.start(run_receiver, answer(200))
    clock = JumpingClock(auto=False)  # retries (5 s on) never fall due: only the backlog
    harness = await start(
        timed_nursery, store, clock=clock, concurrency=4, per_endpoint_concurrency=2
    )
    backlog = [webhook(r, timeout=0.2) for r in dead for _ in range(10)]
    older = T0 - timedelta(minutes=1)

    def write(conn: Any) -> None:
        with conn:
            outbox.enqueue(conn, [outbox_row(t, created=older) for t in backlog])

    await harness.gateway.run(write)
    wanted = [webhook(healthy) for _ in range(5)]
    await harness.enqueue(*wanted)

    done = {(await harness.next_event()).payload["invocation"] for _ in wanted}
    assert done == {str(t.id) for t in wanted}
    untried = [t for t in backlog if harness.row(t).attempts == 0]
    assert len(untried) > len(backlog) // 2, "the healthy rows waited for the dead backlog"
    assert harness.sender.in_flight <= 4


async def test_an_endpoint_failing_before_a_restart_starts_with_one_slot(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    """Rows waiting for their retry say the endpoint was failing: after a restart it gets
    one delivery at a time, not every slot it is allowed, and not this slot back either
    while its probe hangs."""
    dead = await timed_nursery.start(run_receiver, hang)
    healthy = await timed_nursery.start(run_receiver, answer(200))
    backlog = [webhook(dead, timeout=60) for _ in range(5)]
    with store.conn:
        older = T0 - timedelta(hours=1)
        outbox.enqueue(store.conn, [outbox_row(t, created=older) for t in backlog])
        claimed = outbox.claim(store.conn, to_us(T0), to_us(T0), limit=1, per_endpoint=1)
        assert outbox.finish(
            store.conn,
            claimed[0].id,
            claimed[0].lease_until_us,
            Move.RETRY,
            at_us=to_us(T0),
            reason="timed out",
            attempted_us=to_us(T0),
            latency_us=None,
            status_code=None,
            error="Webhook call failed: timed out after 60s",
        )
    harness = await start(
        timed_nursery,
        store,
        clock=JumpingClock(auto=False),
        concurrency=3,
        per_endpoint_concurrency=3,
        probe_concurrency=1,
    )
    wanted = [webhook(healthy) for _ in range(6)]
    await harness.enqueue(*wanted)

    done = {(await harness.next_event()).payload["invocation"] for _ in wanted}
    assert done == {str(t.id) for t in wanted}
    assert len(dead.requests) == 1
    assert harness.sender.endpoints.failing == {endpoint_of(backlog[0].action)}


# --- log lines ------------------------------------------------------------------------------


def outcome_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "daemon.runtime.sender" and hasattr(r, "outcome")
    ]


async def test_every_outcome_is_logged_with_automation_endpoint_and_status(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.runtime.sender")
    receiver = await timed_nursery.start(run_receiver, scripted(Reply(503), Reply(200)))
    harness = await start(timed_nursery, store)
    url = receiver.url("/hook/p4th?key=qu3ry")
    triggered = webhook(receiver, url=url, secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    await harness.enqueue(triggered)
    assert (await harness.next_event()).event == "prefect.automation.action.executed"
    retry, delivered = outcome_lines(caplog)
    endpoint = f"http://127.0.0.1:{receiver.port}"
    assert retry.levelno == logging.INFO
    assert retry.getMessage() == (
        f"delivery {triggered.id} of automation 'pump pressure burst' to {endpoint}: "
        f"HTTP 503; next attempt at {(T0 + timedelta(seconds=5)).isoformat()}"
    )
    assert (retry.outcome, retry.status_code, retry.next_attempt) == (  # type: ignore[attr-defined]
        "retry",
        503,
        T0 + timedelta(seconds=5),
    )
    assert delivered.levelno == logging.INFO
    assert delivered.getMessage() == (
        f"delivery {triggered.id} of automation 'pump pressure burst' to {endpoint}: "
        "delivered (HTTP 200)"
    )
    assert (delivered.outcome, delivered.automation, delivered.endpoint) == (  # type: ignore[attr-defined]
        "delivered",
        "pump pressure burst",
        endpoint,
    )
    for record in (retry, delivered):
        text = record.getMessage() + repr(vars(record))
        for hidden in ("p4th", "qu3ry", "MfKQ9r8"):
            assert hidden not in text


async def test_a_dead_delivery_is_logged_as_a_warning(
    timed_nursery: trio.Nursery, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.runtime.sender")
    receiver = await timed_nursery.start(run_receiver, scripted(Reply(400)))
    harness = await start(timed_nursery, store)
    triggered = webhook(receiver)
    await harness.enqueue(triggered)
    assert (await harness.next_event()).event == "prefect.automation.action.failed"
    (dead,) = outcome_lines(caplog)
    assert dead.levelno == logging.WARNING
    assert dead.getMessage() == (
        f"delivery {triggered.id} of automation 'pump pressure burst' to "
        f"http://127.0.0.1:{receiver.port} is dead: HTTP 400: not retried"
    )
    assert (dead.outcome, dead.status_code, dead.reason) == (  # type: ignore[attr-defined]
        "dead",
        400,
        "HTTP 400: not retried",
    )


# --- storms: the window of a fast endpoint, results committed together --------------------


class Gate:
    """A handler that answers the first `free` requests at once and holds the others
    until `held` of them are waiting together, then answers them all."""

    def __init__(self, free: int, held: int) -> None:
        self.free, self.held = free, held
        self.seen = 0
        self.waiting = 0
        self.open = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever one more waits

    async def __call__(self, request: Request) -> Reply:
        self.seen += 1
        if self.seen <= self.free:
            return Reply(200)
        self.waiting += 1
        self.changed.set()
        self.changed = trio.Event()
        if self.waiting >= self.held:
            self.open.set()
        await self.open.wait()
        return Reply(200)


async def test_a_fast_endpoint_gets_a_wider_window(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    """Six fast answers widen the endpoint's window from 2 to its ceiling of 6: then four
    requests are in flight to it at once (with 2 per endpoint the gate would never open)."""
    gate = Gate(free=6, held=4)
    receiver = await timed_nursery.start(run_receiver, gate)
    harness = await start(
        timed_nursery,
        store,
        concurrency=8,
        per_endpoint_concurrency=2,
        max_per_endpoint=6,
        fast_answer=timedelta(seconds=30),
    )
    rows = [webhook(receiver) for _ in range(10)]
    await harness.enqueue(*rows)
    done = {(await harness.next_event()).payload["invocation"] for _ in rows}
    assert done == {str(t.id) for t in rows}
    assert harness.sender.endpoints.window(endpoint_of(rows[0].action)) == 6


async def test_results_that_end_together_are_committed_together(
    timed_nursery: trio.Nursery, store: Store
) -> None:
    """Three answers arriving while the store is busy are recorded by fewer transactions
    than three: one COMMIT for the batch, not one per delivery. (A new endpoint gets at
    most concurrency - 1 slots until it has answered.)"""
    gate = Gate(free=0, held=1_000)  # opened by the test
    receiver = await timed_nursery.start(run_receiver, gate)
    harness = await start(
        timed_nursery,
        store,
        clock=JumpingClock(auto=False),  # leases never run out while the answers wait
        concurrency=4,
        per_endpoint_concurrency=4,
    )
    attempts_at_commit: list[int] = []
    attempts = 0

    def update(kind: int, _db: str, table: str, _rowid: int) -> None:
        nonlocal attempts
        if table == "delivery_attempts" and kind == apsw.SQLITE_INSERT:
            attempts += 1

    def commit() -> bool:
        attempts_at_commit.append(attempts)
        return False

    def hooks(conn: apsw.Connection, on: bool) -> None:
        conn.set_update_hook(update if on else None)
        conn.set_commit_hook(commit if on else None)

    await harness.gateway.run(hooks, True)
    busy, go_on = threading.Event(), threading.Event()

    def hold_the_store(conn: Any) -> None:
        busy.set()
        go_on.wait(timeout=5)

    rows = [webhook(receiver) for _ in range(3)]
    await harness.enqueue(*rows)
    while gate.waiting < len(rows):
        await gate.changed.wait()
    async with trio.open_nursery() as holding:
        holding.start_soon(harness.gateway.run, hold_the_store)
        await trio.to_thread.run_sync(busy.wait)
        gate.open.set()  # the answers come while the store thread is held
        await trio.testing.wait_all_tasks_blocked(0.2)
        go_on.set()
    done = {(await harness.next_event()).payload["invocation"] for _ in rows}
    assert done == {str(t.id) for t in rows}
    await harness.gateway.run(hooks, False)
    per_commit = [
        b - a for a, b in zip([0, *attempts_at_commit[:-1]], attempts_at_commit, strict=True)
    ]
    assert attempts == len(rows)
    assert max(per_commit) >= 2, per_commit


# --- giving way to acks while clients send events ------------------------------------------


async def _until_waiting(gate: Gate, count: int) -> None:
    while gate.waiting < count:
        await gate.changed.wait()


async def _giving_way(
    nursery: trio.Nursery, store: Store, *, concurrency: int, while_ingesting: int
) -> tuple[Harness, Receiver, Gate, BatchProgress]:
    """A sender that gives way to a real `BatchProgress` (no batch begun yet), quiet
    after 100 ms, its endpoint trusted: one delivery answered, the next ones held."""
    gate = Gate(free=1, held=1_000)
    receiver = await nursery.start(run_receiver, gate)
    progress = BatchProgress()
    harness = await start(
        nursery,
        store,
        ingest=progress,
        concurrency=concurrency,
        per_endpoint_concurrency=concurrency,
        concurrency_while_ingesting=while_ingesting,
        ingest_quiet_after=timedelta(milliseconds=100),
    )
    await harness.enqueue(webhook(receiver))
    await harness.next_event()  # answered while ingest was quiet
    return harness, receiver, gate, progress


@pytest.mark.timeout(30)
async def test_deliveries_give_way_while_clients_send_events(
    timed_nursery: trio.Nursery, store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """An evaluator batch began (the real `BatchProgress` the evaluator counts with): of
    eight due rows, two go out; once `ingest_quiet_after` passes with no other batch,
    the sender claims up to its full six at once, without a new wake-up. Virtual time
    stands still until the test moves it."""
    harness, receiver, gate, progress = await _giving_way(
        timed_nursery, store, concurrency=6, while_ingesting=2
    )

    progress.begin()  # clients send events from now on
    rows = [webhook(receiver) for _ in range(8)]
    await harness.enqueue(*rows)
    await _until_waiting(gate, 2)
    assert harness.sender.in_flight == 2
    mock_clock.jump(0.099)  # still busy: nothing more
    await trio.testing.wait_all_tasks_blocked()
    assert (harness.sender.in_flight, gate.waiting) == (2, 2)

    mock_clock.jump(0.001)  # 100 ms without a batch: quiet
    await _until_waiting(gate, 6)
    assert harness.sender.in_flight == 6  # its whole concurrency

    gate.open.set()
    done = {(await harness.next_event()).payload["invocation"] for _ in rows}
    assert done == {str(t.id) for t in rows}


@pytest.mark.timeout(30)
async def test_a_new_batch_keeps_the_deliveries_giving_way(
    timed_nursery: trio.Nursery, store: Store, mock_clock: trio.testing.MockClock
) -> None:
    """Ingest is quiet only `ingest_quiet_after` after the last batch began: a batch begun
    meanwhile moves the end of giving way on."""
    harness, receiver, gate, progress = await _giving_way(
        timed_nursery, store, concurrency=4, while_ingesting=1
    )

    progress.begin()
    rows = [webhook(receiver) for _ in range(6)]
    await harness.enqueue(*rows)
    await _until_waiting(gate, 1)
    mock_clock.jump(0.06)
    progress.begin()  # another batch: busy until 100 ms from now
    mock_clock.jump(0.06)  # 120 ms after the first batch, 60 ms after this one
    await trio.testing.wait_all_tasks_blocked()
    assert (harness.sender.in_flight, gate.waiting) == (1, 1)

    mock_clock.jump(0.04)
    await _until_waiting(gate, 4)
    assert harness.sender.in_flight == 4
    gate.open.set()
    done = {(await harness.next_event()).payload["invocation"] for _ in rows}
    assert done == {str(t.id) for t in rows}
