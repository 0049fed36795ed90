"""Prefect's EventFilter as trigd reads it: the shape Prefect's client sends, clear errors
for the rest, Prefect's clock-dependent defaults, and `matches`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from daemon.core.event_filter import (
    EventFilter,
    FilterRejected,
    Order,
    matches,
    parse_filter,
)
from daemon.core.events import ReceivedEvent

NOW = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)

# What `EventFilter(event=EventNameFilter(prefix=["pump."])).model_dump(mode="json")` is in
# Prefect 3.8's client, after PrefectEventSubscriber set `occurred`: every key, nulls included.
PREFECT_CLIENT_DUMP: dict[str, Any] = {
    "occurred": {"since": "2026-11-23T10:29:00Z", "until": "2027-11-23T10:30:00Z"},
    "event": {"prefix": ["pump."], "exclude_prefix": None, "name": None, "exclude_name": None},
    "resource": None,
    "related": None,
    "any_resource": None,
    "id": {"id": []},
    "text": None,
    "order": "DESC",
}


def event(name: str = "pump.pressure.high", resource: str = "pump.7", **kw: Any) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": kw.pop("occurred", NOW),
            "event": name,
            "resource": {"prefect.resource.id": resource},
            "id": kw.pop("id", uuid4()),
            "received": NOW,
        }
    )


def test_the_shape_prefects_client_sends_is_read_whole() -> None:
    flt = parse_filter(PREFECT_CLIENT_DUMP)
    assert flt.event is not None
    assert flt.event.prefix == ["pump."]
    assert flt.occurred.since == datetime(2026, 11, 23, 10, 29, tzinfo=UTC)
    assert flt.order is Order.DESC
    assert matches(flt, event())
    assert not matches(flt, event("valve.open"))
    assert not matches(flt, event(occurred=NOW - timedelta(minutes=2)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"evnt": {}}, "filter.evnt: Extra inputs are not permitted"),
        ({"event": {"prefixes": ["a"]}}, "filter.event.prefixes: Extra inputs are not permitted"),
        ({"event": {"prefix": "pump."}}, "filter.event.prefix: Input should be a valid list"),
        ({"occurred": {"since": "yesterday"}}, "filter.occurred.since: Input should be a valid"),
        ({"occurred": {"since": "2026-11-23T10:00:00"}}, "filter.occurred.since: Input should"),
        ({"id": {"id": ["nope"]}}, "filter.id.id[0]: Input should be a valid UUID"),
        ({"order": "SIDEWAYS"}, "filter.order: Input should be 'ASC' or 'DESC'"),
        ({"related": {"id": ["x"]}}, "filter.related: not supported by trigd"),
        ({"any_resource": [{"ids": ["x"]}]}, "filter.any_resource[0].ids: Extra inputs are not"),
        ({"any_resource": {"ids": ["x"]}}, "filter.any_resource[0].ids: Extra inputs are not"),
        ({"any_resource": "site"}, "filter.any_resource: Input should be a valid list"),
        ({"text": {"query": "error"}}, "filter.text: not supported by trigd"),
        ({"resource": {"labels": {"a": 1}}}, "filter.resource.labels.a: Input should be a valid"),
        (
            {"resource": {"labels": {str(i): "x" for i in range(101)}}},
            "filter.resource.labels: at most 100 labels, got 101",
        ),
        ({"resource": {"distinct": True}}, "filter.resource.distinct: Input should be False"),
        ({"event": {"prefix": ["p"] * 101}}, "filter.event.prefix: at most 100 values, got 101"),
        (
            {"id": {"id": ["5f1c5d9e-0000-4000-8000-000000000000"] * 101}},
            "filter.id.id: at most 100 ids, got 101",
        ),
        ({"any_resource": [{}] * 101}, "filter.any_resource: at most 100 filters, got 101"),
        ({"resource": {"id": ["x" * 1025]}}, "filter.resource.id: a value is longer than 1024"),
    ],
)
def test_a_filter_trigd_cannot_answer_is_refused_naming_the_field(
    value: dict[str, Any], expected: str
) -> None:
    with pytest.raises(FilterRejected) as refused:
        parse_filter(value)
    assert str(refused.value).startswith(expected), str(refused.value)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(FilterRejected, match=r"^filter: expected an object"):
        parse_filter(["pump."])


def test_null_is_the_empty_filter_and_resolves_to_prefects_defaults() -> None:
    flt = parse_filter(None).resolve(NOW)
    assert flt.occurred.since == datetime(2026, 5, 27, tzinfo=UTC)  # start of today - 180 days
    assert flt.occurred.until == NOW
    assert matches(flt, event())
    assert not matches(flt, event(occurred=NOW + timedelta(microseconds=1)))


def test_resolve_keeps_bounds_that_were_given() -> None:
    flt = parse_filter({"occurred": {"since": "2026-11-01T00:00:00Z"}}).resolve(NOW)
    assert flt.occurred.since == datetime(2026, 11, 1, tzinfo=UTC)
    assert flt.occurred.until == NOW


def test_clamp_moves_since_forward_only() -> None:
    flt = parse_filter({"occurred": {"since": "2026-11-23T10:00:00Z"}})
    assert flt.clamp(NOW - timedelta(hours=1)).occurred.since == flt.occurred.since
    assert flt.clamp(NOW - timedelta(minutes=5)).occurred.since == NOW - timedelta(minutes=5)


def test_unresolved_open_bounds_match_any_time() -> None:
    flt = EventFilter()
    assert matches(flt, event(occurred=NOW + timedelta(days=3650)))


@pytest.mark.parametrize(
    ("criteria", "name", "resource", "expected"),
    [
        ({"event": {"prefix": ["pump.", "valve."]}}, "valve.open", "v", True),
        ({"event": {"prefix": ["pump."]}}, "pumpkin", "v", False),
        ({"event": {"exclude_prefix": ["pump.p"]}}, "pump.pressure.high", "v", False),
        ({"event": {"name": ["pump.pressure.high"]}}, "pump.pressure.high", "v", True),
        ({"event": {"name": ["pump.pressure"]}}, "pump.pressure.high", "v", False),
        ({"event": {"exclude_name": ["pump.x"]}}, "pump.pressure.high", "v", True),
        ({"event": {"prefix": []}}, "anything", "v", True),
        ({"resource": {"id": ["pump.7"]}}, "e", "pump.7", True),
        ({"resource": {"id": ["pump.7"]}}, "e", "pump.77", False),
        ({"resource": {"id_prefix": ["pump."]}}, "e", "pump.77", True),
        ({"resource": {"id_prefix": ["Pump."]}}, "e", "pump.77", False),
        ({"resource": {"id": ["pump.7"], "id_prefix": ["valve"]}}, "e", "pump.7", False),
    ],
)
def test_matches(criteria: dict[str, Any], name: str, resource: str, expected: bool) -> None:
    assert matches(parse_filter(criteria), event(name, resource)) is expected


def labelled(resource: dict[str, str], related: list[dict[str, str]]) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": NOW,
            "event": "pump.pressure.high",
            "resource": resource,
            "related": related,
            "id": uuid4(),
            "received": NOW,
        }
    )


SITE = {"prefect.resource.id": "site.north", "prefect.resource.role": "site", "zone": "z1"}
PUMP = {"prefect.resource.id": "pump.7", "kind": "pump", "site": "north"}


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ({"resource": {"labels": {"kind": "pump"}}}, True),
        ({"resource": {"labels": {"kind": "pu*"}}}, True),  # trigd's label patterns
        ({"resource": {"labels": {"kind": ["valve", "pump"]}}}, True),
        ({"resource": {"labels": {"kind": "!pump"}}}, False),
        ({"resource": {"labels": {"zone": "z1"}}}, False),  # a related resource's label
        ({"resource": {"labels": {}}}, True),
        ({"any_resource": {"id": ["site.north"]}}, True),
        ({"any_resource": {"labels": {"zone": "z1"}}}, True),
        ({"any_resource": {"id_prefix": ["site."], "labels": {"kind": "pump"}}}, False),
        ({"any_resource": [{"id": ["pump.7"]}, {"id_prefix": ["site."]}]}, True),  # both hold
        ({"any_resource": [{"id": ["pump.7"]}, {"id": ["site.south"]}]}, False),
        ({"any_resource": []}, True),
    ],
)
def test_labels_and_any_resource(criteria: dict[str, Any], expected: bool) -> None:
    flt = parse_filter(criteria)
    assert matches(flt, labelled(PUMP, [SITE])) is expected


def test_matches_by_id() -> None:
    wanted = event()
    flt = parse_filter({"id": {"id": [str(wanted.id)]}})
    assert matches(flt, wanted)
    assert not matches(flt, event())
