"""Firings and triggered actions (docs/TRIGGERS.md#firings,
docs/DELIVERY.md#the-triggeredaction-document).

A `Firing` is one trigger firing once; composite firings nest the child firings that
caused them. A `TriggeredAction` is one action to run for a top-level firing: its JSON is
the outbox row's document and, `redacted()`, the default webhook body, so its shape is
Prefect's exactly. The stored document holds the automation redacted and the action as its
file wrote it (secret and header references, not their values), which the sender needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Final
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

from daemon.core.automations import AnyAction, AnyTrigger, Automation
from daemon.core.events import Event, ReceivedEvent, UTCDateTime, uuid7


class TriggerState(StrEnum):
    Triggered = "Triggered"
    Resolved = "Resolved"


_STATE_ORDER: Final = MappingProxyType({TriggerState.Triggered: 0, TriggerState.Resolved: 1})


def ordered_states(states: frozenset[TriggerState]) -> list[TriggerState]:
    """Triggered before Resolved: the order act() handles them in
    (docs/DELIVERY.md#from-firing-to-outbox)."""
    return sorted(states, key=_STATE_ORDER.__getitem__)


TriggerStates = Annotated[
    frozenset[TriggerState],
    PlainSerializer(ordered_states, return_type=list[TriggerState], when_used="json"),
]


class Firing(BaseModel):
    """One firing of one trigger; `triggered` is the wall clock, not event time."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: UUID = Field(default_factory=uuid7)
    trigger: AnyTrigger
    trigger_states: TriggerStates
    triggered: UTCDateTime
    triggering_labels: dict[str, str] = Field(default_factory=dict)
    triggering_firings: list[Firing] = Field(default_factory=list)
    triggering_event: ReceivedEvent | None = None
    triggering_value: Any = None

    @field_validator("trigger_states")
    @classmethod
    def _not_empty(cls, value: frozenset[TriggerState]) -> frozenset[TriggerState]:
        if not value:
            raise ValueError("At least one trigger state must be provided")
        return value

    def all_firings(self) -> Sequence[Firing]:
        """This firing and every nested child firing, depth first."""
        return [self, *(f for child in self.triggering_firings for f in child.all_firings())]

    def all_events(self) -> Sequence[ReceivedEvent]:
        """The triggering events of all_firings(), in the same order, skipping None."""
        return [f.triggering_event for f in self.all_firings() if f.triggering_event]


class TriggeredAction(BaseModel):
    """One action to perform because an automation fired; `id` is the delivery's
    idempotency key (the `webhook-id` on every retry)."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    automation: Automation
    id: UUID = Field(default_factory=uuid7)
    firing: Firing | None = None
    triggered: UTCDateTime
    triggering_labels: dict[str, str]
    triggering_event: ReceivedEvent | None
    action: AnyAction
    action_index: int = 0
    automation_triggered_event_id: UUID | None = None

    def redacted(self) -> TriggeredAction:
        """This document as trigd sends it: the automation and the action `redacted()`."""
        return self.model_copy(
            update={"automation": self.automation.redacted(), "action": self.action.redacted()}
        )

    def idempotency_key(self) -> str:
        return f"automation {self.automation.id}, action {self.action_index}, invocation {self.id}"

    def all_firings(self) -> Sequence[Firing]:
        return self.firing.all_firings() if self.firing else []

    def all_events(self) -> Sequence[ReceivedEvent]:
        return self.firing.all_events() if self.firing else []


TRIGGERED_EVENT: Final = "prefect.automation.triggered"


def count_firings(counts: dict[str, int], committed: Iterable[Event]) -> None:
    """Add the firings among trigd's own committed events to `counts`, by automation
    name: every firing commits one `prefect.automation.triggered` event, whether the
    reactive path, a proactive pass or a composite made it (`/metrics`)."""
    for event in committed:
        if event.event == TRIGGERED_EVENT:
            resource = event.resource.root
            name = resource.get("prefect.resource.name") or resource["prefect.resource.id"]
            counts[name] = counts.get(name, 0) + 1
