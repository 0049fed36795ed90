"""`daemon.core.lints`: warnings for automations that load but misfire, and the trial
render of their templates (docs/TRIGGERS.md#lints, docs/DELIVERY.md#templates)."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.core.automations import Automation
from daemon.core.events import parse_incoming_event
from daemon.core.lints import (
    PROACTIVE_FOR_EACH_WITHOUT_AFTER,
    SAMPLE_TIME,
    Lint,
    lint_automation,
    sample_event,
    template_problems,
)

HOOK = "http://127.0.0.1:9000/hook"


def automation(trigger: dict[str, Any], *payloads: str) -> Automation:
    actions: list[dict[str, Any]] = [
        {"type": "call-webhook", "url": HOOK, "payload": p} for p in payloads
    ] or [{"type": "do-nothing"}]
    return Automation.model_validate(
        {"name": "watch", "trigger": {"type": "event", **trigger}, "actions": actions}
    )


PROACTIVE = {"posture": "Proactive", "expect": ["pump.heartbeat"], "within": 60}


def test_proactive_for_each_without_after_is_a_warning() -> None:
    lints = lint_automation(automation({**PROACTIVE, "for_each": ["prefect.resource.id"]}))
    assert lints == [Lint(("trigger", "for_each"), PROACTIVE_FOR_EACH_WITHOUT_AFTER)]
    assert lints[0].field == "trigger.for_each"
    assert "never fires" in lints[0].message
    assert "add `after`" in lints[0].message


@pytest.mark.parametrize(
    "trigger",
    [
        PROACTIVE,  # one bucket, opened by the sweeper: fires with no events at all
        {**PROACTIVE, "for_each": ["prefect.resource.id"], "after": ["pump.heartbeat"]},
        {**PROACTIVE, "posture": "Reactive", "for_each": ["prefect.resource.id"]},
    ],
)
def test_triggers_that_do_what_they_say_have_no_warning(trigger: dict[str, Any]) -> None:
    assert lint_automation(automation(trigger)) == []


def test_a_composite_child_is_linted_at_its_path() -> None:
    watch = Automation.model_validate(
        {
            "name": "door",
            "trigger": {
                "type": "sequence",
                "within": 300,
                "triggers": [
                    {"posture": "Reactive", "expect": ["door.opened"]},
                    {**PROACTIVE, "for_each": ["prefect.resource.id"]},
                ],
            },
            "actions": [{"type": "do-nothing"}],
        }
    )
    [lint] = lint_automation(watch)
    assert lint.field == "trigger.triggers[1].for_each"


def test_sample_event_is_named_as_expected_with_the_for_each_labels() -> None:
    event = sample_event(automation({**PROACTIVE, "expect": ["pump.*"], "for_each": ["site"]}))
    assert event.event == "pump.sample"
    assert event.resource.get("site") == "sample"
    assert event.resource_in_role["flow"].id == "prefect.flow.sample"


def problems(*payloads: str, event: dict[str, Any] | None = None) -> list[str]:
    watch = automation({**PROACTIVE, "for_each": ["prefect.resource.id"]}, *payloads)
    if event is None:
        lints = template_problems(watch, sample_event(watch), sample=True)
    else:
        lints = template_problems(watch, parse_incoming_event(event, SAMPLE_TIME), sample=False)
    return [f"{lint.field}: {lint.message}" for lint in lints]


GOOD = (
    '{"a": "{{ automation.name }}", "e": {{ event | tojson }},'
    ' "l": "{{ labels.prefect.resource.id }}", "f": "{{ firing.id }}",'
    ' "n": {{ events | length }}, "d": "{{ event.payload.x | default(1) }}",'
    ' "r": "{{ event.resource.id }} {{ event.occurred }}", "p": "{{ event.payload.temperature }}"}'
)


def test_a_good_template_renders_against_the_sample() -> None:
    assert problems(GOOD, "plain text, not a template") == []


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{{ evnt.id }}", "UndefinedError: 'evnt' is undefined"),
        ("{{ event.ocurred }}", "has no attribute 'ocurred'"),
        ("{{ automation.nmae | tojson }}", "has no attribute 'nmae'"),
        ("{% if firing.triggerd %}x{% endif %}", "has no attribute 'triggerd'"),
    ],
)
def test_undefined_names_and_attributes_fail_the_trial(source: str, error: str) -> None:
    [problem] = problems(GOOD, source)
    assert problem.startswith("actions[1].payload: template fails: ")
    assert error in problem


def test_the_sample_cannot_know_payload_keys_but_your_event_can() -> None:
    source = "{{ event.payload.temperature * 2 }} {{ labels.site.name }}"
    assert problems(source) == []
    event = {"event": "pump.heartbeat", "resource": {"prefect.resource.id": "pump.7"}}
    [problem] = problems(source, event=event)
    assert "has no attribute 'temperature'" in problem
    event["payload"] = {"temperature": 20}
    assert problems("{{ event.payload.temperature * 2 }}", event=event) == []
