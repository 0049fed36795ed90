"""Events and resources, as Prefect's server models them (docs/PROTOCOL.md#event-format).

`Event` is the server's view of what a client sends: `occurred` and `id` are required.
The wire is kinder (docs/PROTOCOL.md#defaults-and-the-received-stamp: both default as in
Prefect's client), so untrusted input goes through `parse_incoming_event`, which fills those
defaults, stamps `received`, and turns every failure into an `EventRejected` carrying a one-line
"which field, why" message.

Parsing is the hot path: validation is done by pydantic-core from bytes, and the only
Python validators are tiny length checks and the UTC normalisation of datetimes. The
wire model's fields are validated into a plain dict (no `_IncomingEvent` is made), the
defaults filled in, and the `ReceivedEvent` made around that dict without revalidation.

A stored event can also be evaluated without its model (`StoredEvent`: the events
table's columns, the JSON parsed on first need): a backtest replays stored rows, and most
triggers need only their name and resource id. The engine reads events through the
`EvaluatedEvent` protocol, which a `ReceivedEvent` satisfies as well.

Untrusted input is also held to what the rest of trigd can compute with and read back:
`occurred` within `OCCURRED_MIN..OCCURRED_MAX` (window arithmetic cannot overflow), and a
payload without NaN or Infinity (which JSON cannot carry) nested at most `max_depth`
levels (so trigd's own events, which embed it, stay within the JSON parser's limit). The
payload is checked by one loop over its containers, no recursion.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Protocol, Self, cast
from uuid import UUID

import uuid6
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, SchemaValidator
from pydantic_core.core_schema import ModelSchema

from daemon.core.clock import from_us, wall_clock

# Limits from Prefect's settings (docs/PROTOCOL.md#bad-input-and-limits). Module attributes, read at
# validation time, so tests can shrink them with monkeypatch.
MAXIMUM_LABELS_PER_RESOURCE = 500
MAXIMUM_RELATED_RESOURCES = 100
MAXIMUM_EVENT_NAME_LENGTH = 1024

RESOURCE_ID: Final = "prefect.resource.id"
RESOURCE_NAME: Final = "prefect.resource.name"
RESOURCE_ROLE: Final = "prefect.resource.role"

_ZERO: Final = timedelta(0)


def as_utc(value: datetime) -> datetime:
    """Naive datetimes are UTC (docs/PROTOCOL.md#event-fields); aware ones are converted to UTC."""
    if value.tzinfo is UTC:  # the common case (the wall clock), cheapest to see
        return value
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if value.utcoffset() != _ZERO:
        return value.astimezone(UTC)
    return value


UTCDateTime = Annotated[datetime, AfterValidator(as_utc)]
"""A datetime that is always aware and in UTC, so it serializes with a `Z` suffix."""

OCCURRED_MIN: Final = datetime(1970, 1, 1, tzinfo=UTC)
OCCURRED_MAX: Final = datetime(8999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
"""The `occurred` trigd accepts. The engine computes windows and lookbacks around it
(`occurred + within`, `occurred - preceding_event_lookback`) with Python datetimes, which
end at year 9999 and begin at year 1: the last thousand years are left for `within`, and
nothing an event source emits predates the epoch trigd counts its microseconds from."""
IncomingDateTime = Annotated[
    datetime, Field(ge=OCCURRED_MIN, le=OCCURRED_MAX), AfterValidator(as_utc)
]
"""`occurred` as a client may send it: within the range the engine computes in (compared
as instants by pydantic-core, before any conversion that could overflow), then UTC."""


class LabelDiver:
    """Labels as nested attributes for templates: `labels.prefect.resource.id`."""

    def __init__(self, labels: Mapping[str, str], value: str = "") -> None:
        self._labels = dict(labels)
        self._value = value
        nested: dict[str, dict[str, str]] = {}
        leaves: dict[str, str] = {}
        for key, label_value in labels.items():
            head, _, tail = key.partition(".")
            if tail:
                nested.setdefault(head, {})[tail] = label_value
            else:
                leaves[head] = label_value
        self._divers = {k: LabelDiver(v, leaves.pop(k, "")) for k, v in nested.items()}
        self._divers.update({k: LabelDiver({}, v) for k, v in leaves.items()})

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"LabelDiver({self._labels!r}, value={self._value!r})"

    def __len__(self) -> int:
        return len(self._labels)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._labels.items())

    def __getitem__(self, key: str) -> str:
        return self._labels[key]

    def __getattr__(self, name: str) -> LabelDiver:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._divers[name]
        except KeyError:
            raise AttributeError(name) from None


class Resource(RootModel[dict[str, str]]):
    """A flat `{label: value}` object naming something an event concerns."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _check_labels(self) -> Self:
        labels = self.root
        if len(labels) > MAXIMUM_LABELS_PER_RESOURCE:
            raise ValueError(
                f"The maximum number of labels per resource is {MAXIMUM_LABELS_PER_RESOURCE}"
            )
        if RESOURCE_ID not in labels:
            raise ValueError("Resources must include the prefect.resource.id label")
        if not labels[RESOURCE_ID]:
            raise ValueError("The prefect.resource.id label must be non-empty")
        return self

    @property
    def id(self) -> str:
        return self.root[RESOURCE_ID]

    @property
    def name(self) -> str | None:
        return self.root.get(RESOURCE_NAME)

    @property
    def role(self) -> str | None:
        return self.root.get(RESOURCE_ROLE)

    @property
    def labels(self) -> LabelDiver:
        return LabelDiver(self.root)

    def get(self, label: str, default: str | None = None) -> str | None:
        return self.root.get(label, default)

    def __getitem__(self, label: str) -> str:
        return self.root[label]

    def __contains__(self, label: object) -> bool:
        return label in self.root

    def __len__(self) -> int:
        return len(self.root)

    def keys(self) -> Iterable[str]:
        return self.root.keys()

    def items(self) -> Iterable[tuple[str, str]]:
        return self.root.items()


class RelatedResource(Resource):
    """A resource playing a named role in an event; the role is mandatory."""

    @model_validator(mode="after")
    def _check_role(self) -> Self:
        if RESOURCE_ROLE not in self.root:
            raise ValueError("Related Resources must include the prefect.resource.role label")
        if not self.root[RESOURCE_ROLE]:
            raise ValueError("The prefect.resource.role label must be non-empty")
        return self

    @property
    def role(self) -> str:
        return self.root[RESOURCE_ROLE]


def _check_event_name(value: str) -> str:
    if len(value) > MAXIMUM_EVENT_NAME_LENGTH:
        raise ValueError(f"Event name must be at most {MAXIMUM_EVENT_NAME_LENGTH} characters")
    return value


def _check_related(value: list[RelatedResource]) -> list[RelatedResource]:
    if len(value) > MAXIMUM_RELATED_RESOURCES:
        raise ValueError(f"The maximum number of related resources is {MAXIMUM_RELATED_RESOURCES}")
    return value


EventName = Annotated[str, AfterValidator(_check_event_name)]
RelatedResources = Annotated[list[RelatedResource], AfterValidator(_check_related)]


def split_related_label(label: str) -> tuple[str, str] | None:
    """(role, label) of a `related:<role>:<label>` reference; None for any other label,
    which names a label of the primary resource."""
    head, _, leaf = label.rpartition(":")
    directive, _, role = head.partition(":")
    return (role, leaf) if directive == "related" else None


class Event(BaseModel):
    """The server view of an event: no defaults for `occurred` and `id`
    (docs/PROTOCOL.md#event-fields)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    occurred: UTCDateTime
    event: EventName
    resource: Resource
    related: RelatedResources = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID
    follows: UUID | None = None

    def __hash__(self) -> int:
        # By id: the dict fields are unhashable, and the id is the dedupe key anyway.
        return hash(self.id)

    @property
    def involved_resources(self) -> Sequence[Resource]:
        return [self.resource, *self.related]

    @property
    def resource_in_role(self) -> Mapping[str, RelatedResource]:
        """The first related resource of each role."""
        return {related.role: related for related in reversed(self.related)}

    @property
    def resource_id(self) -> str:
        return self.resource.root[RESOURCE_ID]

    def parsed(self) -> Self:
        """Itself: a model has every field parsed already (`EventColumns`)."""
        return self

    def find_resource_label(self, label: str) -> str | None:
        """`related:<role>:<label>` looks in the first related resource of that role;
        anything else (or an absent role) is a label of the primary resource."""
        related_label = split_related_label(label)
        if related_label is not None:
            role, leaf = related_label
            for related in self.related:
                if related.role == role:
                    return related.get(leaf)
        return self.resource.get(label)

    def receive(self, received: datetime) -> ReceivedEvent:
        """Stamp this event as received; fields are already valid, so no revalidation."""
        return _received_event({**self._fields(), "received": as_utc(received)})

    def _fields(self) -> dict[str, Any]:
        return {
            "occurred": self.occurred,
            "event": self.event,
            "resource": self.resource,
            "related": self.related,
            "payload": self.payload,
            "id": self.id,
            "follows": self.follows,
        }


def uuid7() -> UUID:
    """A time-ordered UUIDv7 (Prefect's default for event, firing and action ids)."""
    return UUID(int=uuid6.uuid7().int)


class ReceivedEvent(Event):
    """An event after the server got it: `received` is the server's clock."""

    received: UTCDateTime = Field(default_factory=wall_clock)


class EventColumns(Protocol):
    """What matching an event to triggers reads first: its name and resource id, which
    the events table holds as columns; `parsed()` is the whole event, for the rest."""

    @property
    def event(self) -> str: ...
    @property
    def resource_id(self) -> str: ...
    def parsed(self) -> Event: ...


class EvaluatedEvent(EventColumns, Protocol):
    """What the engine reads of an event it evaluates: the events table's columns, and
    `parsed()` for anything else (labels, related resources, a firing's triggering
    event, a parked follower). A `ReceivedEvent` is one; so is a `StoredEvent`."""

    @property
    def id(self) -> UUID: ...
    @property
    def occurred(self) -> datetime: ...
    @property
    def received(self) -> datetime: ...
    @property
    def follows(self) -> UUID | None: ...
    def parsed(self) -> ReceivedEvent: ...


class UnreadableEvent(Exception):
    """A stored event whose JSON the model no longer reads (written by another trigd)."""


class StoredEvent:
    """A row of the events table as an `EvaluatedEvent`: the columns as they are, and the
    `ReceivedEvent` parsed from the row's JSON only when something needs more. A backtest
    replays stored rows, and parsing each was a third of its cost, while most triggers
    need only the name and the resource id. The columns are the model's own values
    (`store.events.EventRow` is made from it), so both give the same answers."""

    __slots__ = (
        "_data",
        "_follows",
        "_id",
        "_model",
        "_received_us",
        "event",
        "occurred",
        "resource_id",
    )

    def __init__(
        self,
        event_id: str,
        event: str,
        resource_id: str,
        occurred_us: int,
        received_us: int,
        follows: str | None,
        data: str,
    ) -> None:
        self._id = event_id
        self.event: Final = event
        self.resource_id: Final = resource_id
        self.occurred: Final = from_us(occurred_us)
        self._received_us = received_us
        self._follows = follows
        self._data = data
        self._model: ReceivedEvent | None = None

    @property
    def id(self) -> UUID:
        return UUID(self._id)

    @property
    def received(self) -> datetime:
        return from_us(self._received_us)

    @property
    def follows(self) -> UUID | None:
        return None if self._follows is None else UUID(self._follows)

    def parsed(self) -> ReceivedEvent:
        """The whole event, parsed once; `UnreadableEvent` if its JSON no longer is one."""
        if self._model is None:
            try:
                self._model = ReceivedEvent.model_validate_json(self._data)
            except ValidationError as exc:
                raise UnreadableEvent(f"stored event {self._id} does not parse: {exc}") from None
        return self._model


class _IncomingEvent(BaseModel):
    """What trigd accepts on the wire: `id` and `occurred` may be absent
    (docs/PROTOCOL.md#defaults-and-the-received-stamp)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    occurred: IncomingDateTime | None = None
    event: EventName
    resource: Resource
    related: RelatedResources = Field(default_factory=list)
    payload: dict[str, Any] = Field(default_factory=dict)
    id: UUID | None = None
    follows: UUID | None = None


class EventRejected(Exception):
    """Untrusted input that is not an acceptable event; `str()` is the reason to reply."""

    def __init__(self, message: str, errors: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors: tuple[tuple[str, str], ...] = tuple(errors)
        """(field path, reason) pairs; the path is "" for the whole frame."""


def format_loc(loc: Sequence[int | str]) -> str:
    """`("related", 0, "prefect.resource.role")` -> `related[0]["prefect.resource.role"]`."""
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.isidentifier():
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{part!r}]".replace("'", '"'))
    return "".join(out)


def error_reason(error: ErrorDetails) -> str:
    """Pydantic's message without the `Value error, ` prefix of our own validators."""
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return message


MAX_REPORTED_ERRORS: Final = 3


def _rejection(exc: ValidationError) -> EventRejected:
    errors = [(format_loc(e["loc"]), error_reason(e)) for e in exc.errors()]
    shown = [f"{path}: {reason}" if path else reason for path, reason in errors]
    message = "; ".join(shown[:MAX_REPORTED_ERRORS])
    if len(shown) > MAX_REPORTED_ERRORS:
        message += f" (and {len(shown) - MAX_REPORTED_ERRORS} more)"
    return EventRejected(message, errors)


_INCOMING_SCHEMA: Final = cast("ModelSchema", _IncomingEvent.__pydantic_core_schema__)
_INCOMING_FIELDS: Final = SchemaValidator(
    _INCOMING_SCHEMA["schema"], _INCOMING_SCHEMA.get("config")
)
"""`_IncomingEvent`'s validation without the model: it returns the validated fields as a
dict (with the extras and the set of fields present), so no `_IncomingEvent` is made only
to be copied into a `ReceivedEvent`."""

_RECEIVED_FIELDS: Final = frozenset(ReceivedEvent.model_fields)
# The setters of the slots pydantic-core fills in a model it makes: calling them directly
# skips the attribute lookup of object.__setattr__ (and the frozen check of setattr).
_set_dict: Final = BaseModel.__dict__["__dict__"].__set__
_set_fields_set: Final = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra: Final = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private: Final = BaseModel.__dict__["__pydantic_private__"].__set__


def _received_event(fields: dict[str, Any]) -> ReceivedEvent:
    """``ReceivedEvent.model_construct(**fields)`` for values that are already valid and
    name every field, in field order: the attributes pydantic-core itself sets, without
    model_construct's loop over the fields (aliases, defaults), which costs as much as
    half a validation."""
    event = ReceivedEvent.__new__(ReceivedEvent)
    _set_dict(event, fields)
    _set_fields_set(event, set(_RECEIVED_FIELDS))
    _set_extra(event, None)
    _set_private(event, None)
    return event


DEFAULT_MAX_JSON_DEPTH: Final = 64
"""Nesting levels an event may have, its own object being level 1 (`[server]
max_json_depth`): real Prefect events have fewer than ten."""
MAX_JSON_DEPTH_CEILING: Final = 128
"""The largest `max_json_depth` allowed. pydantic-core's JSON parser stops at 200 levels,
and trigd nests an event deeper in what it makes of it: 2 levels per automation reacting
to automations (up to 9 before the chain is cut), a few more in the outbox document."""
MIN_JSON_DEPTH: Final = 3
"""The smallest `max_json_depth`: an event's own shape (`related` is a list of objects)."""


def _payload_is_plain(payload: dict[str, Any], max_depth: int) -> bool:
    """True when no float in ``payload`` is NaN or infinite (as `1e999` parses) and no
    container in it is deeper than ``max_depth`` (the payload is level 2). One pass over
    the containers, level by level: about a microsecond for a typical payload."""
    level: list[Any] = [payload]
    depth = 2
    while level:
        deeper: list[Any] = []
        for container in level:
            for value in container.values() if type(container) is dict else container:
                kind = type(value)
                if kind is float:
                    if value - value != 0.0:  # NaN or infinite: inf - inf is NaN
                        return False
                elif kind is dict or kind is list:
                    deeper.append(value)
        if deeper:
            depth += 1
            if depth > max_depth:
                return False
        level = deeper
    return True


def _payload_problem(payload: dict[str, Any], max_depth: int) -> tuple[str, str]:
    """Where ``payload`` is not plain (``_payload_is_plain`` said so) and why: the first
    NaN or infinite number, or the first container too deep, depth first."""
    stack: list[tuple[tuple[int | str, ...], Any, int]] = [(("payload",), payload, 2)]
    while stack:
        loc, container, depth = stack.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, value in items:
            kind = type(value)
            if kind is float and value - value != 0.0:
                return format_loc((*loc, key)), "NaN and Infinity are not valid JSON numbers"
            if kind is dict or kind is list:
                if depth + 1 > max_depth:
                    why = f"nested more than {max_depth} levels deep (max_json_depth)"
                    return "payload", why
                stack.append(((*loc, key), value, depth + 1))
    raise AssertionError("the payload is plain")  # pragma: no cover


def parse_incoming_event(
    data: bytes | bytearray | str | Mapping[str, Any],
    received: datetime,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> ReceivedEvent:
    """Validate one event from a client and stamp it `received`.

    A missing `id` becomes a fresh UUIDv7 and a missing `occurred` becomes `received`,
    as Prefect's client would have set them; any `received` the client sent is ignored.
    The event may nest ``max_depth`` levels (its object is level 1); past about 200 the
    parser itself refuses the frame, so deep input never recurses in Python.
    """
    try:
        if isinstance(data, str | bytes | bytearray):  # not Mapping first: ABCs are slow
            fields = _INCOMING_FIELDS.validate_json(data)[0]
        else:
            fields = _INCOMING_FIELDS.validate_python(data)[0]
    except ValidationError as exc:
        raise _rejection(exc) from None
    payload = fields["payload"]
    if payload and not _payload_is_plain(payload, max_depth):
        path, reason = _payload_problem(payload, max_depth)
        raise EventRejected(f"{path}: {reason}", [(path, reason)])
    received = as_utc(received)
    # `fields` is fresh and in ReceivedEvent's field order, `received` coming last
    if fields["id"] is None:
        fields["id"] = uuid7()
    if fields["occurred"] is None:
        fields["occurred"] = received
    follows = fields["follows"]
    if follows is not None and follows == fields["id"]:
        reason = "an event cannot follow itself"
        raise EventRejected(f"follows: {reason}", [("follows", reason)])
    fields["received"] = received
    return _received_event(fields)
