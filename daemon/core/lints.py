"""Lints: automations that load but do not do what they seem to (docs/TRIGGERS.md#lints).

Pure: an automation in, a list of `Lint`s out. `trigd check` prints them as warnings (with
`--strict`, errors), and `trigd serve` logs them at WARNING on load and reload; a warning
never refuses a load. The trial render of templates is `daemon.core.templates.trial_render`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final, NamedTuple
from uuid import UUID

from daemon.core.automations import (
    ACTION_LISTS,
    Automation,
    CallWebhook,
    CompositeTrigger,
    EventTrigger,
    TriggerTypes,
)
from daemon.core.events import ReceivedEvent, RelatedResource, Resource
from daemon.core.firings import Firing, TriggeredAction, TriggerState
from daemon.core.templates import trial_render
from daemon.core.trigger_models import Posture

LintPath = tuple[str | int, ...]


class Lint(NamedTuple):
    """One warning: where in the automation (`("trigger", "triggers", 0)`) and why."""

    path: LintPath
    message: str

    @property
    def field(self) -> str:
        """The path as written in errors: `trigger.triggers[0]`."""
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
        return text


PROACTIVE_FOR_EACH_WITHOUT_AFTER = (
    "Proactive with for_each and no after: a key's bucket is opened only by an expected "
    "event of that key, so a key that has never sent one is not watched and never fires; "
    "and once a window has reached the threshold the next proactive pass drops that "
    "bucket, so the key is forgotten until its next event. For a heartbeat per key "
    "(fire when a key that was seen goes silent), add `after` with the patterns of `expect` "
    "(docs/TRIGGERS.md#lints)"
)


def _event_triggers(
    trigger: TriggerTypes, path: LintPath
) -> Iterator[tuple[EventTrigger, LintPath]]:
    if isinstance(trigger, EventTrigger):
        yield trigger, path
    elif isinstance(trigger, CompositeTrigger):
        for index, child in enumerate(trigger.triggers):
            yield from _event_triggers(child, (*path, "triggers", index))


def lint_automation(automation: Automation) -> list[Lint]:
    """Every warning for one automation, in trigger order."""
    lints: list[Lint] = []
    for trigger, path in _event_triggers(automation.trigger, ("trigger",)):
        if trigger.posture is Posture.Proactive and trigger.for_each and not trigger.after:
            lints.append(Lint((*path, "for_each"), PROACTIVE_FOR_EACH_WITHOUT_AFTER))
    return lints


SAMPLE_TIME: Final = datetime(2024, 1, 1, tzinfo=UTC)
SAMPLE_EVENT_ID: Final = UUID("00000000-0000-7000-8000-000000000001")


def _concrete(patterns: frozenset[str], default: str) -> str:
    """A name the patterns accept, for a sample: the first, with `*` as `sample`."""
    plain = sorted(p for p in patterns if not p.startswith("!"))
    return plain[0].replace("*", "sample") if plain else default


def sample_event(automation: Automation) -> ReceivedEvent:
    """The built-in sample `trigd check` renders templates with: an event named as the
    first event trigger expects, with its `for_each` labels set, a flow-run resource and
    a related flow, and an empty payload (whose keys the trial cannot know)."""
    triggers = [trigger for trigger, _ in _event_triggers(automation.trigger, ("trigger",))]
    first = triggers[0] if triggers else None
    labels = {
        "prefect.resource.id": "prefect.flow-run.sample",
        "prefect.resource.name": "sample",
    }
    for trigger in triggers:
        for label in trigger.for_each:
            if not label.startswith("related:"):
                labels.setdefault(label, "sample")
    return ReceivedEvent(
        occurred=SAMPLE_TIME,
        event=_concrete(first.expect if first else frozenset(), "sample.event"),
        resource=Resource(labels),
        related=[
            RelatedResource(
                {
                    "prefect.resource.id": "prefect.flow.sample",
                    "prefect.resource.role": "flow",
                    "prefect.resource.name": "sample",
                }
            )
        ],
        payload={},
        id=SAMPLE_EVENT_ID,
        received=SAMPLE_TIME,
    )


def template_problems(automation: Automation, event: ReceivedEvent, *, sample: bool) -> list[Lint]:
    """Trial-render every templated field of every action for `event` (`sample`: the
    built-in one): one Lint per template that fails, at the field, with the template
    error. These are errors, not warnings: the template would fail at delivery."""
    trigger = automation.trigger
    labels = (
        trigger.triggering_labels(trigger.bucketing_key(event))
        if isinstance(trigger, EventTrigger)
        else {}
    )
    firing = Firing(
        trigger=trigger,
        trigger_states=frozenset({TriggerState.Triggered}),
        triggered=event.occurred,
        triggering_labels=labels,
        triggering_event=event,
    )
    problems: list[Lint] = []
    for field in ACTION_LISTS:
        for index, action in enumerate(getattr(automation, field)):
            if not isinstance(action, CallWebhook) or not action.payload:
                continue
            triggered = TriggeredAction(
                automation=automation,
                firing=firing,
                triggered=event.occurred,
                triggering_labels=labels,
                triggering_event=event,
                action=action,
                action_index=index,
            )
            error = trial_render(action.payload, triggered, sample=sample)
            if error is not None:
                problems.append(Lint((field, index, "payload"), f"template fails: {error}"))
    return problems
