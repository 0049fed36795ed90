"""Events out without I/O: the subscriber's first message, and the request, reply and
page tokens of POST /api/events/filter."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from daemon.core.event_filter import FilterRejected
from daemon.wire.events_out import (
    EXPECTED_FILTER,
    PAGE_SIZE,
    PageRequest,
    Refusal,
    Subscription,
    encode_page,
    event_message,
    next_page_token,
    parse_page_request,
    parse_page_token,
    parse_subscription,
)

NOW = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)


def test_a_filter_message_subscribes_with_backfill_by_default() -> None:
    message = json.dumps({"type": "filter", "filter": {"event": {"prefix": ["pump."]}}})
    subscription = parse_subscription(message)
    assert isinstance(subscription, Subscription)
    assert subscription.backfill is True
    assert subscription.filter.event is not None
    assert subscription.filter.event.prefix == ["pump."]
    off = parse_subscription(json.dumps({"type": "filter", "filter": {}, "backfill": False}))
    assert isinstance(off, Subscription)
    assert off.backfill is False


@pytest.mark.parametrize(
    "message",
    [b'{"type": "filter"}', "not json", '{"type": "auth", "token": "x"}', "[]", '"filter"'],
)
def test_anything_but_a_filter_message_is_refused_as_prefect_does(message: str | bytes) -> None:
    assert parse_subscription(message) == Refusal(1002, EXPECTED_FILTER)


def test_an_invalid_filter_is_refused_naming_the_field() -> None:
    refusal = parse_subscription('{"type": "filter", "filter": {"event": {"prefx": []}}}')
    assert refusal == Refusal(
        1002, "Invalid filter: filter.event.prefx: Extra inputs are not permitted"
    )
    bad_backfill = parse_subscription('{"type": "filter", "filter": {}, "backfill": "yes"}')
    assert bad_backfill == Refusal(1002, "Invalid filter: backfill: expected true or false")


def test_a_long_refusal_still_fits_a_close_frame() -> None:
    refusal = parse_subscription(json.dumps({"type": "filter", "filter": {"é" * 200: 1}}))
    assert isinstance(refusal, Refusal)
    assert len(refusal.reason.encode()) <= 123
    assert refusal.reason.startswith("Invalid filter: filter.")


def test_event_message_wraps_the_stored_json_as_is() -> None:
    assert json.loads(event_message('{"id": "x"}')) == {"type": "event", "event": {"id": "x"}}


def test_a_page_request_is_prefects_body_resolved_against_now() -> None:
    request = parse_page_request(b'{"filter": {"event": {"name": ["a"]}}, "limit": 5}', NOW)
    assert request.limit == 5
    assert request.filter.occurred.until == NOW
    assert parse_page_request(b"", NOW).limit == PAGE_SIZE
    assert parse_page_request(None, NOW).filter.occurred.until == NOW
    assert parse_page_request({"limit": 0}, NOW).limit == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{", "body: not valid JSON"),
        (b"[]", "body: expected an object with 'filter' and 'limit'"),
        (b'{"limit": 51}', "body.limit: expected an integer from 0 to 50"),
        (b'{"limit": "5"}', "body.limit: expected an integer from 0 to 50"),
        (b'{"limit": true}', "body.limit: expected an integer from 0 to 50"),
        (b'{"filtre": {}}', "body.filtre: unknown field; expected 'filter' and 'limit'"),
        (b'{"filter": {"order": "UP"}}', "filter.order: Input should be 'ASC' or 'DESC'"),
    ],
)
def test_a_bad_page_request_names_the_field(body: bytes, expected: str) -> None:
    with pytest.raises(FilterRejected) as refused:
        parse_page_request(body, NOW)
    assert str(refused.value).startswith(expected), str(refused.value)


def test_the_page_reply_is_prefects_event_page_with_a_next_page_link() -> None:
    request = parse_page_request(b'{"limit": 2}', NOW)
    reply = json.loads(encode_page(request, ['{"id": 1}', '{"id": 2}'], 5, "http://h:1/"))
    assert reply["events"] == [{"id": 1}, {"id": 2}]
    assert reply["total"] == 5
    prefix = "http://h:1/api/events/filter/next?page-token="
    assert reply["next_page"].startswith(prefix)
    following = parse_page_token(reply["next_page"].removeprefix(prefix))
    assert following == PageRequest(request.filter, 2, 2, 5)
    last = PageRequest(request.filter, 2, 4, 5)
    assert json.loads(encode_page(last, ['{"id": 5}'], 5, "http://h:1"))["next_page"] is None


def test_the_token_is_prefects_shape() -> None:
    request = parse_page_request(b'{"limit": 1}', NOW)
    token = next_page_token(request, 3)
    assert token is not None
    document = json.loads(base64.b64decode(token))
    assert {k: document[k] for k in ("count", "page_size", "offset")} == {
        "count": 3,
        "page_size": 1,
        "offset": 1,
    }
    assert document["filter"]["occurred"]["until"].startswith("2026-11-23T10:30:00")


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        base64.b64encode(b"[]").decode(),
        base64.b64encode(b'{"count": 1, "page_size": 0, "offset": 0}').decode(),
        base64.b64encode(b'{"count": -1, "page_size": 5, "offset": 0}').decode(),
        base64.b64encode(b'{"count": 1, "page_size": 5}').decode(),
        "A" * 70_000,
    ],
)
def test_a_token_not_ours_is_refused(token: str) -> None:
    with pytest.raises(FilterRejected, match=r"^page-token: "):
        parse_page_token(token)
