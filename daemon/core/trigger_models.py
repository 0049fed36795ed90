"""Trigger models, as Prefect's server has them (docs/TRIGGERS.md#event-triggers,
#which-triggers-see-an-event, #buckets).

Pure data plus the matching helpers the engine calls per event (`covers`, `expects`,
`starts_after`, `bucketing_key`, `meets_threshold`); everything per-event is precomputed
in `model_post_init`. Ids default to uuid4 here; `Automation` replaces the defaulted ones
with stable UUIDv5s (docs/TRIGGERS.md#where-trigd-differs-from-prefect), and `fingerprint()` tells a
changed trigger from an unchanged one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self, cast
from uuid import UUID, uuid4

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from daemon.core.durations import parse_duration
from daemon.core.events import RESOURCE_ID, Event, EventColumns, split_related_label
from daemon.core.matching import (
    CompiledPattern,
    ResourceSpecification,
    compile_pattern,
    compiled_matches,
)

PROACTIVE_MINIMUM_WITHIN: Final = timedelta(seconds=10)
_TIMEDELTA: Final = TypeAdapter(timedelta)
_ANY_EVENT: Final = re.compile(".+")  # an empty `expect` covers every event


MAX_WITHIN: Final = timedelta(days=36_525)
"""The longest `within`, 100 years: windows end well inside the dates trigd stores (an
event's `occurred` is at most year 8999), so no window arithmetic can overflow."""


def within_value(value: Any) -> Any:
    """A `within` as written: numbers are seconds; strings are durations as the config
    takes them (`"5m"`, `"1h30m"`, `"PT15M"`, `"90"`, docs/OPERATIONS.md#configuration) or
    pydantic's `"00:05:00"`. Anything else is left to the field's own validation."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as problem:
            try:
                return _TIMEDELTA.validate_python(value)
            except ValidationError:
                raise problem from None
    return value


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


def _sorted(value: frozenset[str]) -> list[str]:
    return sorted(value)


Seconds = Annotated[timedelta, PlainSerializer(_seconds, return_type=float, when_used="json")]
"""A timedelta that is float seconds in JSON (`"within": 10.0`)."""

LabelSet = Annotated[
    frozenset[str], PlainSerializer(_sorted, return_type=list[str], when_used="json")
]
"""A set that is a sorted JSON array, so equal sets always serialize alike."""


class Posture(StrEnum):
    Reactive = "Reactive"
    Proactive = "Proactive"


class BaseTrigger(BaseModel):
    """What every trigger has: a type tag and an id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    id: UUID = Field(default_factory=uuid4)

    def __hash__(self) -> int:
        # By id, so triggers can sit in sets and dict keys (their dict fields are unhashable).
        return hash((type(self).__name__, self.id))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.model_post_init(None)  # the copy's derived state must follow its fields
        return copied

    def all_triggers(self) -> Sequence[TriggerTypes]:
        """This trigger and every trigger nested in it, depth first."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON without this trigger's own id (children keep
        theirs): equal fingerprints under one id mean the trigger did not change."""
        document = self.model_dump(mode="json", exclude={"id"})
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class EventTrigger(BaseTrigger):
    """Fires on the presence (Reactive) or absence (Proactive) of matching events."""

    type: Literal["event"] = "event"
    match: ResourceSpecification = Field(default_factory=lambda: ResourceSpecification({}))
    match_related: ResourceSpecification | list[ResourceSpecification] = Field(
        default_factory=lambda: ResourceSpecification({})
    )
    after: LabelSet = frozenset()
    expect: LabelSet = frozenset()
    for_each: LabelSet = frozenset()
    posture: Posture
    threshold: int = 1
    within: Seconds = Field(timedelta(0), ge=timedelta(0), le=MAX_WITHIN, validate_default=True)

    @field_validator("within", mode="before")
    @classmethod
    def _enforce_within(cls, within: Any, info: ValidationInfo) -> Any:
        """Prefect's rules: null is invalid, numbers are seconds, Proactive needs >= 10 s
        and silently gets 10 s when `within` is missing (the default is validated) or 0."""
        if within is None:
            raise ValueError("`within` should be a valid timedelta")
        within = within_value(within)
        if info.data.get("posture") == Posture.Proactive:
            if not within:
                return PROACTIVE_MINIMUM_WITHIN
            if isinstance(within, timedelta) and within < PROACTIVE_MINIMUM_WITHIN:
                raise ValueError(
                    "`within` for Proactive triggers must be greater than or equal to 10 seconds"
                )
        return within

    def model_post_init(self, context: Any, /) -> None:
        # Precomputed once per trigger, kept in __dict__ beside the fields: covers() runs
        # for every candidate of every event, and pydantic private attributes are slow.
        derived = self.__dict__
        if self.expect:
            alternatives = sorted(self.expect | self.after)
            pattern = "|".join(re.escape(p).replace("\\*", ".+") for p in alternatives)
            derived["_event_pattern"] = re.compile(pattern)
        else:
            derived["_event_pattern"] = _ANY_EVENT
        derived["_for_each"] = tuple(sorted(self.for_each))
        derived["_expect"] = tuple(compile_pattern(p) for p in sorted(self.expect))
        derived["_after"] = tuple(compile_pattern(p) for p in sorted(self.after))
        derived["_reactive"] = reactive = self.posture == Posture.Reactive
        derived["_immediate"] = reactive and self.within == timedelta(0)
        related = self.match_related
        specs = tuple(related) if isinstance(related, list) else (related,)
        derived["_match_related"] = tuple(spec for spec in specs if len(spec))  # {} is a no-op
        # A match on the resource id alone, nothing related: the id decides (a stored
        # event is matched from its column, without parsing it).
        derived["_id_patterns"] = (
            None if derived["_match_related"] else self.match.resource_id_patterns()
        )
        for_each = derived["_for_each"]
        # Labels of the primary resource (no `related:` directive) are read directly.
        derived["_plain_for_each"] = (
            None if any(split_related_label(label) is not None for label in for_each) else for_each
        )
        derived["_key_is_id"] = for_each == (RESOURCE_ID,)

    @property
    def immediate(self) -> bool:
        """Reactive with no window: fires on each qualifying event, no bucket needed."""
        immediate: bool = self.__dict__["_immediate"]
        return immediate

    @property
    def event_pattern(self) -> re.Pattern[str]:
        """Start-anchored regex of expect and after, with `*` → `.+`
        (docs/TRIGGERS.md#which-triggers-see-an-event)."""
        pattern: re.Pattern[str] = self.__dict__["_event_pattern"]
        return pattern

    def covers(self, event: Event) -> bool:
        if not self.__dict__["_event_pattern"].match(event.event):
            return False
        return self.covers_resources(event)

    def covers_resources(self, event: EventColumns) -> bool:
        """`covers` without the name check (the index decides that once per name)."""
        id_patterns: tuple[tuple[CompiledPattern, ...], ...] | None = self.__dict__["_id_patterns"]
        if id_patterns is not None:  # the resource id decides
            if not id_patterns:
                return True
            if len(id_patterns) == 1:  # the common case, without a generator
                return compiled_matches(id_patterns[0], event.resource_id)
            resource_id = event.resource_id
            return all(compiled_matches(patterns, resource_id) for patterns in id_patterns)
        whole = event.parsed()
        if not self.match.matches(whole.resource):
            return False
        specs: tuple[ResourceSpecification, ...] = self.__dict__["_match_related"]
        return not specs or all(spec.includes(whole.related) for spec in specs)

    def expects(self, event_name: str) -> bool:
        return not self.expect or compiled_matches(self.__dict__["_expect"], event_name)

    def starts_after(self, event_name: str) -> bool:
        return compiled_matches(self.__dict__["_after"], event_name)

    @property
    def reactive(self) -> bool:
        """`posture == Posture.Reactive`, precomputed (the bucket arithmetic asks a lot)."""
        reactive: bool = self.__dict__["_reactive"]
        return reactive

    def meets_threshold(self, count: int) -> bool:
        if self.__dict__["_reactive"]:
            return count >= self.threshold
        return count < self.threshold

    @property
    def sorted_for_each(self) -> tuple[str, ...]:
        labels: tuple[str, ...] = self.__dict__["_for_each"]
        return labels

    def bucketing_key(self, event: EventColumns) -> tuple[str, ...]:
        if self.__dict__["_key_is_id"]:  # the common `for_each`, the id (never empty)
            return (event.resource_id,)
        plain: tuple[str, ...] | None = self.__dict__["_plain_for_each"]
        if plain is not None:  # what find_resource_label does for these, minus the parsing
            if not plain:
                return ()
            labels = event.parsed().resource.root
            if len(plain) == 1:  # a `for_each` of one label, without a loop
                return (labels.get(plain[0]) or "",)
            return tuple([labels.get(label) or "" for label in plain])
        whole = event.parsed()
        return tuple(whole.find_resource_label(label) or "" for label in self.sorted_for_each)

    def triggering_labels(self, bucketing_key: Sequence[str]) -> dict[str, str]:
        return dict(zip(self.sorted_for_each, bucketing_key, strict=False))

    def all_triggers(self) -> Sequence[TriggerTypes]:
        return [self]


class CompositeTrigger(BaseTrigger):
    """Fires when its child triggers have fired (`within` null means no time limit)."""

    triggers: list[AnyTrigger]
    within: Seconds | None = Field(le=MAX_WITHIN)

    @field_validator("within", mode="before")
    @classmethod
    def _parse_within(cls, within: Any) -> Any:
        return within_value(within)

    @property
    def num_expected_firings(self) -> int:
        return len(self.triggers)

    @property
    def child_trigger_ids(self) -> list[UUID]:
        return [trigger.id for trigger in self.triggers]

    def all_triggers(self) -> Sequence[TriggerTypes]:
        # a CompositeTrigger is always one of the two below, members of TriggerTypes
        this = cast("CompoundTrigger | SequenceTrigger", self)
        return [this, *(t for child in self.triggers for t in child.all_triggers())]


class CompoundTrigger(CompositeTrigger):
    """Fires when `require` ("any", "all" or a count) of its children have fired."""

    type: Literal["compound"] = "compound"
    require: int | Literal["any", "all"]

    @field_validator("require")
    @classmethod
    def _check_require(cls, require: int | str, info: ValidationInfo) -> int | str:
        if isinstance(require, int):
            if require < 1:
                raise ValueError("require must be at least 1")
            triggers = info.data.get("triggers")
            if triggers is not None and require > len(triggers):
                raise ValueError("require must be less than or equal to the number of triggers")
        return require

    @property
    def num_expected_firings(self) -> int:
        if self.require == "any":
            return 1
        if self.require == "all":
            return len(self.triggers)
        return self.require


class SequenceTrigger(CompositeTrigger):
    """Fires when all of its children have fired, in declaration order."""

    type: Literal["sequence"] = "sequence"

    @property
    def expected_firing_order(self) -> list[UUID]:
        return self.child_trigger_ids


TriggerTypes = EventTrigger | CompoundTrigger | SequenceTrigger
TRIGGER_TYPES: Final = ("event", "compound", "sequence")


def _trigger_tag(value: Any) -> str | None:
    """Prefect's client fallback: `type`, else triggers+require → compound,
    triggers → sequence, else event."""
    if isinstance(value, dict):
        if "type" in value:
            return str(value["type"])
        if "triggers" in value:
            return "compound" if "require" in value else "sequence"
        return "event"
    tag = getattr(value, "type", None)
    return tag if isinstance(tag, str) else None


def _check_trigger_type(value: Any) -> Any:
    if isinstance(value, BaseTrigger):
        return value
    if not isinstance(value, dict):
        raise ValueError("a trigger must be an object")
    kind = _trigger_tag(value)
    if kind not in TRIGGER_TYPES:
        supported = ", ".join(repr(t) for t in TRIGGER_TYPES)
        raise ValueError(f"unsupported trigger type {kind!r}; supported types: {supported}")
    return value


AnyTrigger = Annotated[
    Annotated[EventTrigger, Tag("event")]
    | Annotated[CompoundTrigger, Tag("compound")]
    | Annotated[SequenceTrigger, Tag("sequence")],
    Discriminator(_trigger_tag),
    BeforeValidator(_check_trigger_type),
]
"""Field type for any trigger, parsed with the client-side discriminator fallback."""

CompositeTrigger.model_rebuild()
CompoundTrigger.model_rebuild()
SequenceTrigger.model_rebuild()

_TRIGGER_ADAPTER: TypeAdapter[TriggerTypes] = TypeAdapter(AnyTrigger)


def parse_trigger(data: Any) -> TriggerTypes:
    """Validate one trigger (a dict, or JSON text/bytes)."""
    if isinstance(data, str | bytes):
        return _TRIGGER_ADAPTER.validate_json(data)
    return _TRIGGER_ADAPTER.validate_python(data)
