"""The HTTP rules without sockets: route resolution (404, 405, 401), JSON errors, the body
of ``POST /api/events`` (all or nothing, 422 naming index and field), upgrade detection."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from daemon.core.events import ReceivedEvent
from daemon.wire.http import (
    HttpReply,
    HttpRequest,
    Route,
    is_websocket_upgrade,
    parse_events_body,
    path_params,
    query_params,
    resolve,
)
from tests.support.ingest_client import event_dict

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


async def _ok(request: HttpRequest) -> HttpReply:
    return HttpReply(200)


ROUTES = (
    Route("GET", "/api/health", _ok, public=True),
    Route("GET", "/api/admin/version", _ok),
    Route("POST", "/api/events", _ok),
)


def request(method: str, target: str, *headers: tuple[bytes, bytes]) -> HttpRequest:
    return HttpRequest(method, target, tuple(headers))


def detail(reply: HttpReply) -> Any:
    assert reply.content_type == b"application/json"
    return json.loads(reply.body)["detail"]


def test_a_route_is_found_by_method_and_path_ignoring_the_query() -> None:
    assert resolve(ROUTES, request("GET", "/api/health?x=1"), "") is ROUTES[0]
    assert resolve(ROUTES, request("HEAD", "/api/health"), "") is ROUTES[0]
    assert resolve(ROUTES, request("POST", "/api/events"), "") is ROUTES[2]


def test_a_template_route_matches_its_shape_and_gives_its_segments_decoded() -> None:
    template = "/api/automations/{id}/explain"
    routes = (*ROUTES, Route("GET", template, _ok))
    assert resolve(routes, request("GET", "/api/automations/a%20b/explain?key=x"), "") is routes[3]
    assert path_params(template, "/api/automations/a%20b/explain") == {"id": "a b"}
    assert path_params(template, "/api/automations//explain") is None
    assert path_params(template, "/api/automations/a/b/explain") is None
    assert path_params(template, "/api/automations/a/other") is None
    assert path_params("/api/health", "/api/health") == {}
    missing = resolve(routes, request("GET", "/api/automations/a"), "")
    assert isinstance(missing, HttpReply)
    assert missing.status == 404
    assert query_params("/x?key=%5B%22a%22%5D&key=2&b=") == {"key": '["a"]'}


def test_an_unknown_path_is_404_and_a_wrong_method_405_with_allow() -> None:
    missing = resolve(ROUTES, request("GET", "/nope"), "")
    assert isinstance(missing, HttpReply)
    assert missing.status == 404
    assert detail(missing) == "no route '/nope'"
    wrong = resolve(ROUTES, request("DELETE", "/api/events"), "")
    assert isinstance(wrong, HttpReply)
    assert wrong.status == 405
    assert (b"allow", b"POST") in wrong.headers
    assert detail(wrong) == "DELETE is not allowed on /api/events"


def test_with_a_token_only_public_routes_answer_without_it() -> None:
    token = "s3cret"
    assert resolve(ROUTES, request("GET", "/api/health"), token) is ROUTES[0]
    refused = resolve(ROUTES, request("GET", "/api/admin/version"), token)
    assert isinstance(refused, HttpReply)
    assert refused.status == 401
    assert token not in refused.body.decode()
    wrong = resolve(
        ROUTES, request("GET", "/api/admin/version", (b"authorization", b"Bearer x")), token
    )
    assert isinstance(wrong, HttpReply)
    assert wrong.status == 401
    bearer = (b"Authorization", b"Bearer s3cret")
    assert resolve(ROUTES, request("GET", "/api/admin/version", bearer), token) is ROUTES[1]


def test_upgrade_detection_reads_the_upgrade_header_tokens() -> None:
    assert is_websocket_upgrade([(b"Upgrade", b"WebSocket")])
    assert is_websocket_upgrade([(b"upgrade", b"h2c, websocket")])
    assert not is_websocket_upgrade([(b"upgrade", b"h2c")])
    assert not is_websocket_upgrade([(b"connection", b"keep-alive")])


def body(*events: Any) -> bytes:
    return json.dumps(list(events)).encode()


def test_a_valid_array_gives_every_event_stamped_received() -> None:
    first, second = event_dict(), event_dict(event="pump.started")
    parsed = parse_events_body(body(first, second), NOW, 1_000_000, 64)
    assert isinstance(parsed, list)
    assert [str(e.id) for e in parsed] == [first["id"], second["id"]]
    assert all(isinstance(e, ReceivedEvent) and e.received == NOW for e in parsed)


def test_an_empty_array_is_nothing_to_do() -> None:
    assert parse_events_body(b" [ ] ", NOW, 1_000_000, 64) == []


def test_one_invalid_event_refuses_the_whole_body_naming_its_index_and_field() -> None:
    bad = event_dict(occurred="yesterday")
    reply = parse_events_body(body(event_dict(), event_dict(), bad), NOW, 1_000_000, 64)
    assert isinstance(reply, HttpReply)
    assert reply.status == 422
    text = detail(reply)
    assert text.startswith("event [2]: occurred")


def test_a_body_that_is_not_an_array_of_events_is_422() -> None:
    for raw, why in [
        (b'{"id": 1}', "body: expected a JSON array of events"),
        (b"\xff[", "body: not UTF-8 (byte 0)"),
        (b"[1]", "event [0]: an event must be a JSON object"),
    ]:
        reply = parse_events_body(raw, NOW, 1_000_000, 64)
        assert isinstance(reply, HttpReply)
        assert reply.status == 422
        assert detail(reply) == why
    broken = parse_events_body(b"[{", NOW, 1_000_000, 64)
    assert isinstance(broken, HttpReply)
    assert detail(broken).startswith("body: not valid JSON")


@given(st.binary(max_size=200))
def test_any_bytes_give_events_or_a_422_never_an_exception(raw: bytes) -> None:
    parsed = parse_events_body(raw, NOW, 1_000, 16)
    assert isinstance(parsed, list) or parsed.status == 422
