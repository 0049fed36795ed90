"""Events and resources: scenarios a10, a14 (resources and events), a15, and the wire parser."""

from __future__ import annotations

import json
import pickle
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon.core import events
from daemon.core.events import (
    Event,
    EventRejected,
    ReceivedEvent,
    RelatedResource,
    Resource,
    parse_incoming_event,
)
from tests.support.strategies import json_scalars, received_events

NOW = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)


def errors_of(
    exc: pytest.ExceptionInfo[ValidationError],
) -> list[tuple[tuple[int | str, ...], str]]:
    return [(tuple(e["loc"]), e["msg"]) for e in exc.value.errors()]


# --- Resources (a14) ------------------------------------------------------------------------


def test_a14_resource_requires_id() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("Resources must include the prefect.resource.id label")
    ):
        Resource({"hello": "world"})


def test_a14_resource_id_must_be_non_empty() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("The prefect.resource.id label must be non-empty")
    ):
        Resource({"prefect.resource.id": ""})


def test_a14_resource_id_null_is_not_a_string() -> None:
    with pytest.raises(ValidationError) as exc:
        Resource.model_validate({"prefect.resource.id": None})
    assert exc.value.errors()[0]["type"] == "string_type"
    assert "Input should be a valid string" in str(exc.value)


def test_a14_any_null_label_is_a_string_type_error() -> None:
    with pytest.raises(ValidationError) as exc:
        Resource.model_validate({"prefect.resource.id": "x", "other": None})
    assert [(e["type"], e["loc"]) for e in exc.value.errors()] == [("string_type", ("other",))]


def test_a14_related_requires_role() -> None:
    with pytest.raises(
        ValidationError,
        match=re.escape("Related Resources must include the prefect.resource.role label"),
    ):
        RelatedResource({"prefect.resource.id": "x"})
    with pytest.raises(
        ValidationError, match=re.escape("The prefect.resource.role label must be non-empty")
    ):
        RelatedResource({"prefect.resource.id": "x", "prefect.resource.role": ""})


def test_a14_related_also_requires_id() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("Resources must include the prefect.resource.id")
    ):
        RelatedResource({"prefect.resource.role": "r"})


def test_a14_label_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAXIMUM_LABELS_PER_RESOURCE", 10)
    labels = {"prefect.resource.id": "x"} | {f"label-{i}": "v" for i in range(9)}
    assert len(Resource(labels)) == 10
    with pytest.raises(ValidationError, match="The maximum number of labels per resource is 10"):
        Resource(labels | {"one-too-many": "v"})


def test_a14_default_label_limit_is_500() -> None:
    labels = {"prefect.resource.id": "x"} | {f"l{i}": "v" for i in range(499)}
    Resource(labels)
    with pytest.raises(ValidationError, match="is 500"):
        Resource(labels | {"more": "v"})


def related(n: int) -> list[dict[str, str]]:
    return [{"prefect.resource.id": f"r{i}", "prefect.resource.role": "x"} for i in range(n)]


def test_a14_related_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAXIMUM_RELATED_RESOURCES", 10)
    base = {"occurred": NOW, "event": "e", "resource": {"prefect.resource.id": "x"}, "id": uuid4()}
    assert len(Event.model_validate(base | {"related": related(10)}).related) == 10
    with pytest.raises(ValidationError, match="The maximum number of related resources is 10"):
        Event.model_validate(base | {"related": related(11)})


def test_a14_server_event_requires_occurred() -> None:
    with pytest.raises(ValidationError) as exc:
        Event.model_validate(
            {"event": "e", "resource": {"prefect.resource.id": "x"}, "id": uuid4()}
        )
    assert errors_of(exc) == [(("occurred",), "Field required")]


def test_a14_server_event_requires_id() -> None:
    with pytest.raises(ValidationError) as exc:
        Event.model_validate(
            {"occurred": NOW, "event": "e", "resource": {"prefect.resource.id": "x"}}
        )
    assert errors_of(exc) == [(("id",), "Field required")]


def test_a14_event_name_length() -> None:
    base = {"occurred": NOW, "resource": {"prefect.resource.id": "x"}, "id": uuid4()}
    Event.model_validate(base | {"event": "x" * 1024})
    with pytest.raises(ValidationError, match="Event name must be at most 1024 characters"):
        Event.model_validate(base | {"event": "x" * 1025})


def test_event_ignores_unknown_fields_and_defaults() -> None:
    event = Event.model_validate(
        {
            "occurred": NOW,
            "event": "e",
            "resource": {"prefect.resource.id": "x"},
            "id": uuid4(),
            "x": 1,
        }
    )
    assert event.related == []
    assert event.payload == {}
    assert event.follows is None


# --- Helpers (a10) --------------------------------------------------------------------------


def make_event(**overrides: Any) -> ReceivedEvent:
    fields: dict[str, Any] = {
        "occurred": NOW,
        "event": "hello",
        "resource": {"prefect.resource.id": "hello"},
        "id": uuid4(),
        "received": NOW,
    }
    return ReceivedEvent.model_validate(fields | overrides)


def test_a10_find_resource_label() -> None:
    event = make_event(
        resource={
            "prefect.resource.id": "hello",
            "name": "Hello!",
            "related:psychout:name": "Psych!",
        },
        related=[
            {"prefect.resource.id": "r1", "prefect.resource.role": "role-1", "name": "Related 1"},
            {"prefect.resource.id": "r2", "prefect.resource.role": "role-1", "name": "Related 2"},
            {"prefect.resource.id": "r3", "prefect.resource.role": "role-2", "name": "Related 3"},
        ],
    )
    assert event.find_resource_label("name") == "Hello!"
    assert event.find_resource_label("related:role-1:name") == "Related 1"
    assert event.find_resource_label("related:role-2:name") == "Related 3"
    assert event.find_resource_label("related:psychout:name") == "Psych!"
    assert event.find_resource_label("nope") is None


def test_a10_first_related_of_a_role_wins_even_without_the_label() -> None:
    event = make_event(
        related=[
            {"prefect.resource.id": "r1", "prefect.resource.role": "r"},
            {"prefect.resource.id": "r2", "prefect.resource.role": "r", "name": "second"},
        ]
    )
    assert event.find_resource_label("related:r:name") is None
    assert event.find_resource_label("related:r:prefect.resource.id") == "r1"


def test_resource_helpers() -> None:
    event = make_event(
        resource={"prefect.resource.id": "a", "prefect.resource.name": "A", "x.y": "z"},
        related=[
            {"prefect.resource.id": "r1", "prefect.resource.role": "one"},
            {"prefect.resource.id": "r2", "prefect.resource.role": "two"},
            {"prefect.resource.id": "r3", "prefect.resource.role": "one"},
        ],
    )
    assert event.resource.id == "a"
    assert event.resource.name == "A"
    assert event.resource.role is None
    assert event.resource.get("x.y") == "z"
    assert str(event.resource.labels.x.y) == "z"
    assert dict(event.resource.labels) == event.resource.root
    assert [r.id for r in event.involved_resources] == ["a", "r1", "r2", "r3"]
    assert {role: r.id for role, r in event.resource_in_role.items()} == {"one": "r1", "two": "r2"}
    assert event.related[1].role == "two"
    assert event.related[1].name is None


# --- JSON (a15) -----------------------------------------------------------------------------


def test_a15_json_form_of_received_event() -> None:
    event_id = uuid4()
    event = ReceivedEvent(
        occurred=datetime(2021, 2, 3, 4, 5, 6, 7),
        event="hello",
        resource=Resource({"prefect.resource.id": "hello"}),
        related=[
            RelatedResource({"prefect.resource.id": "related-1", "prefect.resource.role": "r"})
        ],
        payload={"hello": "world"},
        id=event_id,
        received=datetime(2021, 2, 3, 4, 5, 6, 78, tzinfo=UTC),
    )
    assert event.model_dump_json() == (
        '{"occurred":"2021-02-03T04:05:06.000007Z","event":"hello",'
        '"resource":{"prefect.resource.id":"hello"},'
        '"related":[{"prefect.resource.id":"related-1","prefect.resource.role":"r"}],'
        f'"payload":{{"hello":"world"}},"id":"{event_id}","follows":null,'
        '"received":"2021-02-03T04:05:06.000078Z"}'
    )


def test_a15_whole_seconds_have_no_fraction_and_offsets_become_utc() -> None:
    tz = timezone(timedelta(hours=2))
    event = make_event(occurred=datetime(2021, 2, 3, 6, 5, 6, tzinfo=tz))
    dumped = json.loads(event.model_dump_json())
    assert dumped["occurred"] == "2021-02-03T04:05:06Z"
    assert list(dumped) == [
        "occurred", "event", "resource", "related", "payload", "id", "follows", "received",
    ]  # fmt: skip


def test_receive_copies_and_stamps() -> None:
    event = Event(
        occurred=NOW,
        event="e",
        resource=Resource({"prefect.resource.id": "x"}),
        id=uuid4(),
    )
    received = event.receive(datetime(2030, 1, 1))
    assert received.received == datetime(2030, 1, 1, tzinfo=UTC)
    assert received.id == event.id
    assert received.occurred == event.occurred
    assert ReceivedEvent.model_validate_json(received.model_dump_json()) == received


# --- parse_incoming_event -------------------------------------------------------------------

FRAME: dict[str, Any] = {
    "id": "2f0c2bde-3d0e-4c1f-9a61-6a2d2a8f3b10",
    "occurred": "2026-11-23T10:00:00.123456Z",
    "event": "pump.pressure.high",
    "resource": {"prefect.resource.id": "pump.7", "site": "north"},
    "related": [{"prefect.resource.id": "site.north", "prefect.resource.role": "site"}],
    "payload": {"bar": 9.2},
    "follows": None,
}


@pytest.mark.parametrize("encode", [json.dumps, lambda d: json.dumps(d).encode(), dict])
def test_parse_incoming_accepts_str_bytes_and_dicts(encode: Any) -> None:
    event = parse_incoming_event(encode(FRAME), NOW)
    assert event.id == UUID(FRAME["id"])
    assert event.occurred == datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
    assert event.received == NOW
    assert event.resource["site"] == "north"
    assert event.related[0].role == "site"
    assert event.payload == {"bar": 9.2}


def test_parsed_events_are_what_model_construct_would_make() -> None:
    """parse_incoming_event builds the model without model_construct: same model."""
    event = parse_incoming_event(json.dumps(FRAME), NOW)
    fields = {name: getattr(event, name) for name in ReceivedEvent.model_fields}
    constructed = ReceivedEvent.model_construct(**fields)
    assert type(event) is ReceivedEvent
    assert event == constructed
    assert repr(event) == repr(constructed)
    assert list(event.__dict__) == list(constructed.__dict__)
    assert event.model_fields_set == constructed.model_fields_set
    assert event.model_extra is None
    assert event.__pydantic_private__ is None
    assert event.model_dump_json() == constructed.model_dump_json()
    assert pickle.loads(pickle.dumps(event)) == event
    assert hash(event) == hash(constructed)
    changed = event.model_copy(update={"event": "other"})
    assert changed.event == "other"
    assert event.event == FRAME["event"]
    other = parse_incoming_event(json.dumps(FRAME), NOW)
    assert other.model_fields_set is not event.model_fields_set


def test_parse_incoming_defaults_id_and_occurred() -> None:
    frame = {k: v for k, v in FRAME.items() if k not in ("id", "occurred")}
    first = parse_incoming_event(json.dumps(frame), NOW)
    second = parse_incoming_event(json.dumps(frame), NOW)
    assert first.occurred == NOW
    assert first.id.version == 7
    assert first.id != second.id
    assert type(first.id) is UUID


def test_parse_incoming_ignores_a_client_received() -> None:
    frame = FRAME | {"received": "2000-01-01T00:00:00Z"}
    assert parse_incoming_event(json.dumps(frame), NOW).received == NOW


def test_parse_incoming_treats_naive_times_as_utc() -> None:
    frame = FRAME | {"occurred": "2026-11-23T10:00:00"}
    event = parse_incoming_event(json.dumps(frame), datetime(2026, 11, 23, 11))
    assert event.occurred == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert event.received == datetime(2026, 11, 23, 11, tzinfo=UTC)
    assert event.model_dump_json().endswith('"received":"2026-11-23T11:00:00Z"}')


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            FRAME | {"resource": {"site": "north"}},
            "resource: Resources must include the prefect.resource.id label",
        ),
        (
            FRAME | {"related": [{"prefect.resource.id": "x"}]},
            "related[0]: Related Resources must include the prefect.resource.role label",
        ),
        (
            FRAME | {"resource": {"prefect.resource.id": None}},
            'resource["prefect.resource.id"]: Input should be a valid string',
        ),
        (FRAME | {"event": "x" * 1025}, "event: Event name must be at most 1024 characters"),
        (FRAME | {"follows": FRAME["id"]}, "follows: an event cannot follow itself"),
        (FRAME | {"id": "nope"}, "id: Input should be a valid UUID"),
        ({"resource": {"prefect.resource.id": "x"}}, "event: Field required"),
    ],
)
def test_parse_incoming_rejects_with_field_and_reason(frame: dict[str, Any], message: str) -> None:
    with pytest.raises(EventRejected) as exc:
        parse_incoming_event(json.dumps(frame), NOW)
    assert str(exc.value).startswith(message)
    assert exc.value.errors


def test_parse_incoming_rejects_non_json_and_non_objects() -> None:
    with pytest.raises(EventRejected, match="Invalid JSON"):
        parse_incoming_event(b"{not json", NOW)
    with pytest.raises(EventRejected, match="Input should be an object"):
        parse_incoming_event("[1, 2]", NOW)


def test_parse_incoming_summarises_many_errors() -> None:
    with pytest.raises(EventRejected) as exc:
        parse_incoming_event(json.dumps({"id": 1, "occurred": "x", "follows": 3}), NOW)
    assert len(exc.value.errors) == 5
    assert str(exc.value).endswith("(and 2 more)")


# --- Round trips ----------------------------------------------------------------------------


@settings(deadline=None)  # timing varies under a loaded CI machine
@given(received_events())
def test_received_event_json_round_trip(event: ReceivedEvent) -> None:
    assert ReceivedEvent.model_validate_json(event.model_dump_json()) == event
    assert ReceivedEvent.model_validate_json(event.model_dump_json().encode()) == event


@settings(deadline=None)  # timing varies under a loaded CI machine
@given(received_events())
def test_incoming_parse_preserves_everything_but_received(event: ReceivedEvent) -> None:
    if event.follows == event.id:
        return
    again = parse_incoming_event(event.model_dump_json(), NOW)
    assert again == event.model_copy(update={"received": NOW})


# --- What the engine and the store can take (hardening) ----------------------------------


@pytest.mark.parametrize(
    ("occurred", "bound"),
    [
        ("0001-01-01T00:00:00Z", "greater"),  # timedelta arithmetic below year 1
        ("9999-12-31T23:59:30Z", "less"),  # + within: 60 is past year 9999
        ("9999-12-31T23:59:59-05:00", "less"),  # UTC of it is past year 9999
        ("0001-01-01T00:00:00+05:00", "greater"),  # UTC of it is before year 1
        ("1969-12-31T23:59:59.999999Z", "greater"),
        ("9000-01-01T00:00:00Z", "less"),
        (-1e12, "greater"),  # a number is a Unix timestamp: 1938
    ],
)
def test_occurred_out_of_range_is_rejected_naming_the_field_and_the_bound(
    occurred: Any, bound: str
) -> None:
    with pytest.raises(EventRejected) as exc:
        parse_incoming_event(json.dumps(FRAME | {"occurred": occurred}), NOW)
    expected = {
        "greater": "occurred: Input should be greater than or equal to 1970-01-01T00:00:00Z",
        "less": "occurred: Input should be less than or equal to 8999-12-31T23:59:59.999999Z",
    }
    assert exc.value.message == expected[bound]
    assert exc.value.errors[0][0] == "occurred"


def test_occurred_at_the_ends_of_the_range_is_accepted() -> None:
    for occurred in (events.OCCURRED_MIN, events.OCCURRED_MAX):
        event = parse_incoming_event(json.dumps(FRAME | {"occurred": occurred.isoformat()}), NOW)
        assert event.occurred == occurred


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ('{"a": NaN}', "payload.a"),
        ('{"a": {"b": [1, Infinity]}}', "payload.a.b[1]"),
        ('{"a": -Infinity}', "payload.a"),
        ('{"big": 1e999}', "payload.big"),  # overflows to infinity
        ('{"x y": [[-1e400]]}', 'payload["x y"][0][0]'),
    ],
)
def test_nan_and_infinity_in_the_payload_are_rejected_naming_the_field(
    payload: str, where: str
) -> None:
    frame = json.dumps(FRAME | {"payload": {}}).replace('"payload": {}', f'"payload": {payload}')
    with pytest.raises(EventRejected) as exc:
        parse_incoming_event(frame, NOW)
    assert exc.value.message == f"{where}: NaN and Infinity are not valid JSON numbers"
    with pytest.raises(EventRejected, match="NaN and Infinity"):  # already parsed, too
        parse_incoming_event(json.loads(frame), NOW)


def nested(levels: int) -> Any:
    """`levels` containers, one inside the other, alternating lists and objects."""
    value: Any = 1
    for level in range(levels):
        value = [value] if level % 2 else {"a": value}
    return value


def test_the_payload_may_nest_up_to_max_depth() -> None:
    # the event is level 1 and its payload level 2: 62 more containers make 64
    payload = {"a": nested(62)}
    event = parse_incoming_event(json.dumps(FRAME | {"payload": payload}), NOW, max_depth=64)
    assert event.payload == payload
    assert ReceivedEvent.model_validate_json(event.model_dump_json()) == event
    with pytest.raises(EventRejected) as exc:
        parse_incoming_event(json.dumps(FRAME | {"payload": {"a": nested(63)}}), NOW, 64)
    assert exc.value.message == "payload: nested more than 64 levels deep (max_json_depth)"
    with pytest.raises(EventRejected, match="more than 8 levels"):
        parse_incoming_event(FRAME | {"payload": {"a": nested(7)}}, NOW, max_depth=8)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_a_frame_nested_a_thousand_levels_is_rejected(opener: str) -> None:
    """The parser stops at its own limit (about 200) before Python could recurse."""
    frame = json.dumps(FRAME | {"payload": {}}).replace(
        '"payload": {}', '"payload": ' + opener * 1000
    )
    with pytest.raises(EventRejected, match="recursion limit exceeded"):
        parse_incoming_event(frame, NOW)
    with pytest.raises(EventRejected, match="recursion limit exceeded"):
        parse_incoming_event(opener * 1000, NOW)


hostile_values = st.recursive(
    json_scalars | st.floats() | st.text(),  # NaN and infinities included
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=30,
)


@settings(deadline=None, max_examples=300)
@given(hostile_values, st.integers(min_value=3, max_value=12))
def test_any_payload_is_either_refused_or_read_back_unchanged(value: Any, depth: int) -> None:
    """Whatever is accepted stores and reads back as it was: nothing turns into null."""
    frame = json.dumps(FRAME | {"payload": {"v": value}})  # NaN as NaN, inf as Infinity
    refusal: str | None = None
    event: ReceivedEvent | None = None
    try:
        event = parse_incoming_event(frame, NOW, max_depth=depth)
    except EventRejected as exc:
        refusal = exc.message
    if event is None:
        assert refusal is not None
        assert "NaN and Infinity" in refusal or "max_json_depth" in refusal
        return
    stored = event.model_dump_json()
    assert json.loads(stored)["payload"] == {"v": value}
    assert ReceivedEvent.model_validate_json(stored) == event
