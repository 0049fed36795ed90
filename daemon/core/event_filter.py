"""Prefect's ``EventFilter``, the part trigd can answer: which events a subscriber of
``/api/events/out`` or a ``POST /api/events/filter`` query wants (docs/PROTOCOL.md#events-out).

The JSON shape is the one Prefect's client sends (``EventFilter.model_dump(mode="json")``):
every key it writes is accepted, including the empty forms of the criteria trigd does not
evaluate (``related``, ``any_resource``, ``text``, ``resource.labels``,
``resource.distinct``), so an unchanged Prefect client works; a non-empty one is refused
by name rather than silently ignored, as is any key Prefect does not have.

``occurred`` is resolved against ``now`` by the caller (``resolve``): Prefect's defaults
depend on the clock (``since`` 180 days before the start of today, ``until`` now), and a
model that read the clock could not be tested with a fixed one.

``matches`` is the live feed's test of one event; ``store.events.query_events`` says the
same in SQL, and tests hold the two to agreement.
"""

from __future__ import annotations

import enum
from datetime import datetime, time, timedelta
from typing import Any, Final, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.core.events import Event, format_loc

DEFAULT_LOOKBACK: Final = timedelta(days=180)
"""Prefect's default ``occurred.since``: this long before the start of today (UTC)."""

MAX_LIST: Final = 100
"""Values in one criterion's list (prefixes, names, ids): a filter is untrusted input."""

MAX_VALUE_CHARS: Final = 1_024
"""Characters in one prefix, name or id of a filter."""


class FilterRejected(Exception):
    """A filter that is not one trigd can answer; ``str()`` names the field and why."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Values = list[str] | None


def _bounded(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if len(value) > MAX_LIST:
        raise ValueError(f"at most {MAX_LIST} values, got {len(value)}")
    for item in value:
        if len(item) > MAX_VALUE_CHARS:
            raise ValueError(f"a value is longer than {MAX_VALUE_CHARS} characters")
    return value


def _absent(value: Any) -> Any:
    """Prefect's client writes criteria trigd does not evaluate as null (or empty)."""
    if value is None or value == [] or value == {}:
        return value
    raise ValueError("not supported by trigd; leave it out or null")


class OccurredFilter(_Part):
    """``since`` and ``until`` are inclusive; None is Prefect's default, applied by
    ``resolve``."""

    since: AwareDatetime | None = None
    until: AwareDatetime | None = None


class NameFilter(_Part):
    prefix: Values = None
    exclude_prefix: Values = None
    name: Values = None
    exclude_name: Values = None

    _bounds = field_validator("prefix", "exclude_prefix", "name", "exclude_name")(_bounded)


class ResourceFilter(_Part):
    id: Values = None
    id_prefix: Values = None
    labels: dict[str, Any] | None = None
    distinct: Literal[False] = False

    _bounds = field_validator("id", "id_prefix")(_bounded)
    _labels = field_validator("labels")(_absent)


class IdFilter(_Part):
    id: list[UUID] | None = None

    @field_validator("id")
    @classmethod
    def _few(cls, value: list[UUID] | None) -> list[UUID] | None:
        if value is not None and len(value) > MAX_LIST:
            raise ValueError(f"at most {MAX_LIST} ids, got {len(value)}")
        return value


class Order(enum.StrEnum):
    ASC = "ASC"
    DESC = "DESC"


class EventFilter(_Part):
    """Prefect's ``EventFilter``; every criterion present must hold (AND), and within
    one list any value may (OR)."""

    occurred: OccurredFilter = Field(default_factory=OccurredFilter)
    event: NameFilter | None = None
    resource: ResourceFilter | None = None
    related: Any = None
    any_resource: Any = None
    id: IdFilter = Field(default_factory=IdFilter)
    text: Any = None
    order: Order = Order.DESC

    _unsupported = field_validator("related", "any_resource", "text")(_absent)

    def resolve(self, now: datetime) -> EventFilter:
        """This filter with Prefect's clock-dependent defaults filled in."""
        occurred = self.occurred
        if occurred.since is not None and occurred.until is not None:
            return self
        start_of_day = datetime.combine(now.date(), time(), now.tzinfo)
        since = occurred.since if occurred.since is not None else start_of_day - DEFAULT_LOOKBACK
        until = occurred.until if occurred.until is not None else now
        return self.model_copy(update={"occurred": OccurredFilter(since=since, until=until)})

    def clamp(self, oldest: datetime) -> EventFilter:
        """Not reaching back before ``oldest`` (a subscriber's backfill window)."""
        since = self.occurred.since
        if since is not None and since >= oldest:
            return self
        occurred = self.occurred.model_copy(update={"since": oldest})
        return self.model_copy(update={"occurred": occurred})


def parse_filter(value: Any, where: str = "filter") -> EventFilter:
    """A filter from decoded JSON (a dict; None is the empty filter), or FilterRejected
    naming the first fields at fault."""
    if value is None:
        return EventFilter()
    if not isinstance(value, dict):
        raise FilterRejected(f"{where}: expected an object")
    try:
        return EventFilter.model_validate(value)
    except ValidationError as exc:
        raise FilterRejected(describe_errors(exc, where)) from None


def describe_errors(exc: ValidationError, where: str) -> str:
    """Pydantic's errors as ``where.field: why`` (the first three)."""
    shown = []
    for error in exc.errors()[:3]:
        path = format_loc([where, *error["loc"]])
        shown.append(f"{path}: {error['msg'].removeprefix('Value error, ')}")
    more = len(exc.errors()) - len(shown)
    return "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def matches(flt: EventFilter, event: Event) -> bool:
    """Does ``event`` pass ``flt``? (``flt`` resolved: an open bound is no bound.)"""
    occurred = flt.occurred
    if occurred.since is not None and event.occurred < occurred.since:
        return False
    if occurred.until is not None and event.occurred > occurred.until:
        return False
    name = event.event
    names = flt.event
    if names is not None:
        if names.prefix and not any(name.startswith(p) for p in names.prefix):
            return False
        if names.exclude_prefix and any(name.startswith(p) for p in names.exclude_prefix):
            return False
        if names.name and name not in names.name:
            return False
        if names.exclude_name and name in names.exclude_name:
            return False
    resources = flt.resource
    if resources is not None:
        resource_id = event.resource.id
        if resources.id and resource_id not in resources.id:
            return False
        if resources.id_prefix and not any(resource_id.startswith(p) for p in resources.id_prefix):
            return False
    ids = flt.id.id
    return not ids or event.id in ids


__all__ = [
    "EventFilter",
    "FilterRejected",
    "IdFilter",
    "NameFilter",
    "OccurredFilter",
    "Order",
    "ResourceFilter",
    "matches",
    "parse_filter",
]
