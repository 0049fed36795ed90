"""The sender and secrets: real webhooks to a receiver on 127.0.0.1 from rows that act()
wrote in a real database. No body carries a secret, header value or url token; the sender
signs with the secret and sends the headers its action's references resolve to, after a
restart too, since the rows hold references and never the values they stand for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from standardwebhooks.webhooks import Webhook

from daemon.core.automations import Automation
from daemon.core.clock import wall_clock
from daemon.core.delivery import DeliveryState
from daemon.core.firings import Firing, TriggerState
from daemon.engine.acting import act
from store.db import Store
from store.events import peek_inbox
from tests.support.daemon_process import database_bytes
from tests.support.sender_harness import start
from tests.support.webhook_receiver import (
    T0,
    JumpingClock,
    Receiver,
    answer,
    make_triggered,
    run_receiver,
    triggering_event,
)

SIGNING = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # action a: from the environment
TOKEN = "Bearer pd-7f3c91e0"  # action a: an Authorization header from a file
LITERAL = "plain-shared-b-55e1"  # action b: a secret written in the automation file
LITERAL_HEADER = "hdr-b-0c4d"  # action b: a header value written in the file
URL_TOKEN = "u-tok-9e31"  # in action b's url query


def two_webhooks(receiver: Receiver, token_file: Path) -> Automation:
    return Automation.model_validate(
        {
            "name": "pump pressure burst",
            "trigger": {"posture": "Reactive", "expect": ["pump.pressure.high"]},
            "actions": [
                {
                    "type": "call-webhook",
                    "url": receiver.url("/a"),
                    "secret": "env:HOOK_SIGNING_TEST",
                    "headers": {"Authorization": f"file:{token_file}", "X-Team": "ops"},
                },
                {
                    "type": "call-webhook",
                    "url": receiver.url(f"/b?token={URL_TOKEN}"),
                    "secret": LITERAL,
                    "headers": {"X-Key": LITERAL_HEADER},
                    "payload": "{{ automation.model_dump_json() }}",
                },
            ],
        }
    )


async def test_a_restarted_sender_signs_and_sends_headers_without_a_secret_in_any_body(
    timed_nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SIGNING_TEST", SIGNING)
    token_file = tmp_path / "pd.token"
    token_file.write_text(f"{TOKEN}\n")
    receiver: Receiver = await timed_nursery.start(run_receiver, answer(200))
    automation = two_webhooks(receiver, token_file)
    firing = Firing(
        trigger=automation.trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=T0,
        triggering_labels={},
        triggering_event=triggering_event(),
    )
    path = tmp_path / "trigd.db"
    store = Store.open(path, synchronous="normal")
    with store.conn:
        act(store.conn, automation, firing, T0)
    documents = [str(d) for (d,) in store.conn.execute("SELECT document FROM outbox")]
    store.close()
    # the literal secret is in its own action's row only (the sender needs it), not beside
    # the other action in the automation each row carries
    assert sorted(d.count(LITERAL) for d in documents) == [0, 1]
    at_rest = database_bytes(tmp_path)
    assert SIGNING.encode() not in at_rest  # the rows hold the references
    assert TOKEN.encode() not in at_rest

    store = Store.open(path, synchronous="normal")  # a restart: the sender has only the rows
    harness = await start(timed_nursery, store, clock=wall_clock)
    requests = {}
    for _ in range(2):
        request = await receiver.next_request()
        requests[request.target.split("?")[0]] = request
    events = [await harness.next_event() for _ in range(2)]

    hidden = [s.encode() for s in (SIGNING, TOKEN, LITERAL, LITERAL_HEADER, URL_TOKEN, "/a")]
    hidden.append(b"pd.token")  # not even where the secret is
    for request in requests.values():
        for secret in hidden:
            assert secret not in request.body, (secret, request.target)
    a, b = requests["/a"], requests["/b"]
    Webhook(SIGNING).verify(a.body.decode(), a.headers)
    Webhook(LITERAL.encode()).verify(b.body.decode(), b.headers)
    assert (a.headers["authorization"], a.headers["x-team"]) == (TOKEN, "ops")
    assert b.headers["x-key"] == LITERAL_HEADER
    document = json.loads(a.body)
    assert document["action"]["secret"] == "********"
    assert document["action"]["headers"] == {"Authorization": "********", "X-Team": "********"}
    rendered = json.loads(b.body)  # {{ automation.model_dump_json() }}
    assert [x["secret"] for x in rendered["actions"]] == ["********", "********"]

    assert {e.event for e in events} == {"prefect.automation.action.executed"}
    inbox = b"".join(e.encode() for _, e in peek_inbox(store.conn, 100))
    for secret in hidden[:5]:
        assert secret not in inbox  # nor in the events trigd made
    at_rest = database_bytes(tmp_path)  # the sender still runs: its store stays open
    assert SIGNING.encode() not in at_rest
    assert TOKEN.encode() not in at_rest


async def test_a_reference_that_no_longer_resolves_is_retried_and_named(
    timed_nursery: trio.Nursery, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    receiver: Receiver = await timed_nursery.start(run_receiver, answer(200))
    clock = JumpingClock(auto=False)
    store = Store.open(tmp_path / "trigd.db", synchronous="normal")
    harness = await start(timed_nursery, store, clock=clock)
    triggered = make_triggered(
        {
            "type": "call-webhook",
            "url": receiver.url(),
            "headers": {"Authorization": f"file:{token_file}"},
        }
    )
    await harness.enqueue(triggered)  # the file is not there (yet, or any more)

    due = await clock.next_sleep()
    [failed] = harness.attempts(triggered)
    assert failed.error == (
        f"Webhook call failed: headers.Authorization: 'file:{token_file}' cannot be read: "
        "no such file or directory"
    )
    assert harness.row(triggered).status is DeliveryState.PENDING
    assert receiver.requests == []

    token_file.write_text(f"{TOKEN}\n")
    clock.advance_to(due)
    assert (await harness.next_event()).event == "prefect.automation.action.executed"
    [request] = receiver.requests
    assert request.headers["authorization"] == TOKEN
