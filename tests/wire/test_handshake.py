"""The wire protocol's pure functions against hostile input: every parse of what a client
sends is bounded, and every refusal is an answer (a nack or a close), never an exception.
The same inputs against the running daemon are in tests/runtime/test_ingest.py and
tests/e2e/test_hostile_frames.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from daemon.wire.handshake import (
    EMPTY_ARRAY,
    EXPECTED_AUTH,
    POLICY_VIOLATION,
    Close,
    Nack,
    check_auth,
    decode_frame,
)

RECEIVED = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
MAX_BYTES = 1_500_000


def event_text(**overrides: Any) -> str:
    event = {
        "id": str(uuid4()),
        "occurred": "2026-11-23T09:59:00Z",
        "event": "pump.pressure.high",
        "resource": {"prefect.resource.id": "pump.7"},
        "payload": {"bar": 9.2},
    }
    return json.dumps(event | overrides)


DEEP = ["[" * 1000, '{"a":' * 1000, "[" * 1000 + "]" * 1000]
"""1 KB frames nested past any parser's patience (the last one is complete JSON)."""


@pytest.mark.parametrize("message", DEEP)
def test_an_auth_message_nested_too_deep_closes_1008(message: str) -> None:
    assert check_auth(message, "", authenticated=True) == Close(POLICY_VIOLATION, EXPECTED_AUTH)


def test_an_auth_message_in_a_binary_frame_closes_1008() -> None:
    """Prefect reads the auth message with ``receive_json``, which takes text frames."""
    refused = check_auth(b'{"type": "auth", "token": "t"}', "t", authenticated=False)
    assert refused == Close(POLICY_VIOLATION, EXPECTED_AUTH)
    assert check_auth('{"type": "auth", "token": "t"}', "t", authenticated=False) is None


@pytest.mark.parametrize("frame", [*DEEP, "[" + "[" * 1000])
def test_a_frame_nested_too_deep_is_a_nack(frame: str) -> None:
    (nack,) = decode_frame(frame, RECEIVED, MAX_BYTES)
    assert isinstance(nack, Nack)
    assert "recursion limit exceeded" in nack.error


def test_an_event_nested_too_deep_in_an_array_is_refused_alone() -> None:
    good = json.loads(event_text())
    deep = event_text(payload={})[:-1] + ', "payload": ' + "[" * 1000
    too_deep = json.loads(event_text()) | {"payload": {"a": [[[[[1]]]]]}}
    frame = f"[{json.dumps(good)}, {json.dumps(too_deep)}]"
    ok, nack = decode_frame(frame, RECEIVED, MAX_BYTES, max_json_depth=6)
    assert not isinstance(ok, Nack)
    assert str(ok.id) == good["id"]
    assert nack == Nack(
        too_deep["id"], "event [1]: payload: nested more than 6 levels deep (max_json_depth)"
    )
    (whole,) = decode_frame(f"[{json.dumps(good)}, {deep}]", RECEIVED, MAX_BYTES)
    assert isinstance(whole, Nack)  # the array itself does not parse
    assert "recursion limit exceeded" in whole.error


def test_an_empty_array_is_a_nack() -> None:
    assert decode_frame("[]", RECEIVED, MAX_BYTES) == [Nack(None, EMPTY_ARRAY)]
    assert decode_frame(" [ ] ", RECEIVED, MAX_BYTES) == [Nack(None, EMPTY_ARRAY)]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_alone_and_in_arrays(literal: str) -> None:
    event_id = str(uuid4())
    text = event_text(id=event_id, payload={"x": {"y": "@"}}).replace('"@"', literal)
    (alone,) = decode_frame(text, RECEIVED, MAX_BYTES)
    assert alone == Nack(event_id, "payload.x.y: NaN and Infinity are not valid JSON numbers")
    (inside,) = decode_frame(f"[{text}]", RECEIVED, MAX_BYTES)
    assert inside == Nack(
        event_id, "event [0]: payload.x.y: NaN and Infinity are not valid JSON numbers"
    )


def test_a_lone_surrogate_is_refused_in_an_array_as_it_is_alone() -> None:
    """Python's json would make a str that cannot be encoded to UTF-8 for the store."""
    text = event_text(event="@").replace('"@"', '"\\ud800"')
    (alone,) = decode_frame(text, RECEIVED, MAX_BYTES)
    (inside,) = decode_frame(f"[{text}]", RECEIVED, MAX_BYTES)
    assert isinstance(alone, Nack)
    assert isinstance(inside, Nack)
    assert "frame: not valid JSON" in inside.error


def test_an_occurred_out_of_range_is_a_nack_naming_it() -> None:
    for occurred in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:30Z", "9999-12-31T23:59:59-05:00"):
        (nack,) = decode_frame(event_text(occurred=occurred), RECEIVED, MAX_BYTES)
        assert isinstance(nack, Nack)
        assert nack.error.startswith("occurred: Input should be ")
        assert "1970-01-01T00:00:00Z" in nack.error or "8999-12-31T23:59:59.999999Z" in nack.error
