"""daemon/wire/upstream.py: Prefect's client side of /events/in and /events/out, as bytes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from daemon.core.events import EventRejected
from daemon.wire.upstream import (
    Credentials,
    OversizedEvent,
    UpstreamRefused,
    auth_message,
    check_auth_reply,
    event_from_message,
    filter_message,
    socket_url,
    upgrade_headers,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_socket_urls_follow_the_api_url() -> None:
    assert socket_url("http://prefect:4200/api", "/events/in") == "ws://prefect:4200/api/events/in"
    assert (
        socket_url("https://api.prefect.cloud/api/accounts/a/workspaces/w", "/events/out")
        == "wss://api.prefect.cloud/api/accounts/a/workspaces/w/events/out"
    )


def test_a_self_hosted_server_gets_basic_credentials_and_the_auth_message() -> None:
    creds = Credentials(auth_string="admin:pw")
    assert upgrade_headers(creds) == [(b"authorization", b"Basic " + base64.b64encode(b"admin:pw"))]
    assert json.loads(auth_message(creds, events_out=False) or "") == {
        "type": "auth",
        "token": "admin:pw",
    }
    none = Credentials()
    assert upgrade_headers(none) == []
    assert json.loads(auth_message(none, events_out=True) or "") == {"type": "auth", "token": None}


def test_prefect_cloud_gets_a_bearer_key_and_no_auth_message_on_events_in() -> None:
    creds = Credentials(api_key="pnu_key")
    assert upgrade_headers(creds) == [(b"authorization", b"Bearer pnu_key")]
    assert auth_message(creds, events_out=False) is None
    assert json.loads(auth_message(creds, events_out=True) or "")["token"] == "pnu_key"
    assert "pnu_key" not in repr(creds)


def test_auth_replies() -> None:
    check_auth_reply('{"type": "auth_success"}')
    with pytest.raises(UpstreamRefused, match="authentication refused: Invalid token"):
        check_auth_reply('{"type": "auth_failure", "reason": "Invalid token"}')
    with pytest.raises(UpstreamRefused, match="not JSON"):
        check_auth_reply("{")


def test_the_filter_message_starts_from_the_position_less_a_margin() -> None:
    message = json.loads(filter_message({"event": {"prefix": ["a."]}}, NOW, NOW))
    assert message["type"] == "filter"
    assert message["backfill"] is True
    assert message["filter"]["event"] == {"prefix": ["a."]}
    assert message["filter"]["order"] == "ASC"
    since = datetime.fromisoformat(message["filter"]["occurred"]["since"])
    assert since == NOW - timedelta(minutes=1)
    first = json.loads(filter_message({}, None, NOW + timedelta(hours=1)))
    assert datetime.fromisoformat(first["filter"]["occurred"]["since"]) == NOW + timedelta(
        minutes=59
    )


def test_an_event_message_becomes_a_received_event() -> None:
    event = {
        "id": "01a24334-17d5-70b4-a75a-e03d5d2e30a4",
        "occurred": "2026-12-04T11:59:00Z",
        "event": "prefect.flow-run.Completed",
        "resource": {"prefect.resource.id": "prefect.flow-run.1"},
        "received": "2020-01-01T00:00:00Z",
    }
    received = event_from_message(json.dumps({"type": "event", "event": event}), NOW, 64, 10_000)
    assert str(received.id) == event["id"]
    assert received.received == NOW  # trigd stamps its own arrival time


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("[", "not JSON"),
        ('{"type": "ping"}', 'expected a message {"type": "event"'),
        ('{"type": "event", "event": 3}', "event: expected an object"),
        ('{"type": "event", "event": {"event": "x"}}', "resource"),
    ],
)
def test_bad_event_messages_are_refused_with_the_reason(message: str, expected: str) -> None:
    with pytest.raises(EventRejected, match=expected):
        event_from_message(message, NOW, 64, 10_000)


def test_an_event_past_max_event_bytes_is_refused_naming_its_id_and_when_it_occurred() -> None:
    event = {
        "occurred": "2026-12-04T11:59:00Z",
        "event": "big",
        "resource": {"prefect.resource.id": "r"},
        "payload": {"blob": "x" * 20_000},
        "id": "01a24334-17d5-70b4-a75a-e03d5d2e30a4",
    }
    message = json.dumps({"type": "event", "event": event})
    assert event_from_message(message, NOW, 64, 20_000).event == "big"  # the envelope's room
    with pytest.raises(OversizedEvent) as caught:
        event_from_message(message, NOW, 64, 10_000)
    assert str(caught.value) == (
        f"event {event['id']}: {len(message)} bytes, larger than max_event_bytes (10000)"
    )
    assert caught.value.occurred == datetime(2026, 12, 4, 11, 59, tzinfo=UTC)
    nameless = json.dumps({"type": "event", "event": {"payload": "x" * 20_000}})
    with pytest.raises(OversizedEvent) as caught:
        event_from_message(nameless, NOW, 64, 10_000)
    assert (caught.value.event_id, caught.value.occurred) == (None, None)
    assert str(caught.value).startswith(f"{len(nameless)} bytes")
