"""Prefect's ``EventFilter``, the part trigd can answer: which events a subscriber of
``/api/events/out`` or a ``POST /api/events/filter`` query wants (docs/PROTOCOL.md#events-out).

The JSON shape is the one Prefect's client sends (``EventFilter.model_dump(mode="json")``):
every key it writes is accepted, including the empty forms of the criteria trigd does not
evaluate (``related``, ``text``, ``resource.distinct``), so an unchanged Prefect client
works; a non-empty one is refused by name rather than silently ignored, as is any key
Prefect does not have. Labels (``resource.labels``, ``any_resource``) are matched with
trigd's label patterns (``daemon.core.matching``), as triggers match them.

``occurred`` is resolved against ``now`` by the caller (``resolve``): Prefect's defaults
depend on the clock (``since`` 180 days before the start of today, ``until`` now), and a
model that read the clock could not be tested with a fixed one.

``matches`` is the live feed's test of one event; ``store.events.query_events`` says the
same in SQL, and tests hold the two to agreement.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sized
from datetime import datetime, time, timedelta
from typing import Annotated, Any, Final, Literal, TypeVar
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from daemon.core.events import Event, Resource, format_loc
from daemon.core.matching import ResourceSpecification

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
_Sized = TypeVar("_Sized", bound=Sized | None)


def _at_most(what: str) -> Callable[[_Sized], _Sized]:
    """A validator: a list (or mapping) of at most MAX_LIST `what`, or None."""

    def check(value: _Sized) -> _Sized:
        if value is not None and len(value) > MAX_LIST:
            raise ValueError(f"at most {MAX_LIST} {what}, got {len(value)}")
        return value

    return check


def _bounded(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    _at_most("values")(value)
    for item in value:
        if len(item) > MAX_VALUE_CHARS:
            raise ValueError(f"a value is longer than {MAX_VALUE_CHARS} characters")
    return value


def _as_list(value: Any) -> Any:
    """Prefect takes one filter or a list of them (all to hold): trigd keeps a list."""
    return [value] if isinstance(value, dict) else value


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


def _few_labels(value: ResourceSpecification | None) -> ResourceSpecification | None:
    if value is None:
        return None
    _at_most("labels")(value)
    for _, patterns in value.items():
        _bounded(patterns)
    return value


class ResourceFilter(_Part):
    id: Values = None
    id_prefix: Values = None
    labels: ResourceSpecification | None = None
    distinct: Literal[False] = False

    _bounds = field_validator("id", "id_prefix")(_bounded)
    _labels = field_validator("labels")(_few_labels)

    def matches(self, resource: Resource) -> bool:
        return _passes(self.id, self.id_prefix, self.labels, resource)

    @property
    def needs_labels(self) -> bool:
        """Whether matching reads more than the resource id (SQL cannot index it)."""
        return bool(self.labels)


class AnyResourceFilter(_Part):
    """Holds when the event's resource or one of its related resources passes."""

    id: Values = None
    id_prefix: Values = None
    labels: ResourceSpecification | None = None

    _bounds = field_validator("id", "id_prefix")(_bounded)
    _labels = field_validator("labels")(_few_labels)

    def matches(self, event: Event) -> bool:
        ids, prefixes, labels = self.id, self.id_prefix, self.labels
        return any(_passes(ids, prefixes, labels, r) for r in event.involved_resources)


def _passes(
    ids: Values, prefixes: Values, labels: ResourceSpecification | None, resource: Resource
) -> bool:
    """Prefect's resource criteria: each one given must hold."""
    resource_id = resource.id
    if ids and resource_id not in ids:
        return False
    if prefixes and not any(resource_id.startswith(p) for p in prefixes):
        return False
    return not labels or labels.matches(resource)


class IdFilter(_Part):
    id: list[UUID] | None = None

    _few = field_validator("id")(_at_most("ids"))


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
    any_resource: Annotated[list[AnyResourceFilter] | None, BeforeValidator(_as_list)] = None
    id: IdFilter = Field(default_factory=IdFilter)
    text: Any = None
    order: Order = Order.DESC

    _unsupported = field_validator("related", "text")(_absent)

    _few = field_validator("any_resource")(_at_most("filters"))

    @property
    def any_resources(self) -> list[AnyResourceFilter]:
        """``any_resource``, every one of which must hold."""
        return self.any_resource or []

    def needs_whole_event(self) -> bool:
        """Whether matching reads more than the indexed columns (the stored JSON too)."""
        resources = self.resource
        return bool(self.any_resources) or (resources is not None and resources.needs_labels)

    def matches_beyond_columns(self, event: Event) -> bool:
        """The criteria of ``needs_whole_event``: labels and any resource."""
        resources = self.resource
        if (
            resources is not None
            and resources.labels
            and not resources.labels.matches(event.resource)
        ):
            return False
        return all(part.matches(event) for part in self.any_resources)

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


_UNION_TAGS: Final = frozenset({"str", "list[str]"})
"""What pydantic adds to an error's location for the member of a label's union."""


def describe_errors(exc: ValidationError, where: str) -> str:
    """Pydantic's errors as ``where.field: why`` (the first three)."""
    shown = []
    for error in exc.errors()[:3]:
        path = format_loc([where, *(p for p in error["loc"] if p not in _UNION_TAGS)])
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
    if resources is not None and not resources.matches(event.resource):
        return False
    if flt.any_resource is not None and not all(p.matches(event) for p in flt.any_resources):
        return False
    ids = flt.id.id
    return not ids or event.id in ids


__all__ = [
    "AnyResourceFilter",
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
