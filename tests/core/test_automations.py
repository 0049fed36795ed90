"""Triggers, actions, automations and their files: scenarios a11-a14, stable ids, loader."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4, uuid5

import pytest
from hypothesis import given, settings
from pydantic import ValidationError

from daemon.core.automations import (
    AUTOMATION_NAMESPACE,
    Automation,
    AutomationFileError,
    CallWebhook,
    CompoundTrigger,
    DoNothing,
    EventTrigger,
    Posture,
    SequenceTrigger,
    TriggerTypes,
    automation_id_for,
    load_automation_files,
    parse_trigger,
    trigger_id_for,
)
from daemon.core.events import ReceivedEvent
from daemon.core.matching import ResourceSpecification
from tests.support.engine_harness import CHONK, DAFFODIL, HEART, LILY, SPIDER, TULIP
from tests.support.samples import PUMP_YAML
from tests.support.strategies import automations, triggers

S = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)


def event(
    name: str, micros: int, resource: dict[str, str], related: list[dict[str, str]] | None = None
) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": S + timedelta(microseconds=micros),
            "event": name,
            "resource": resource,
            "related": related or [],
            "id": uuid4(),
            "received": S,
        }
    )


spider_walked = event("animal.walked", 1, SPIDER)
chonk_walked = event("animal.walked", 2, CHONK)
nibbled = event("animal.ingested", 2, CHONK, [LILY, TULIP])
gobbled = event("animal.ingested", 3, CHONK, [HEART, DAFFODIL])


def event_trigger(**fields: Any) -> EventTrigger:
    trigger = parse_trigger({"type": "event", "posture": "Reactive", **fields})
    assert isinstance(trigger, EventTrigger)
    return trigger


ARACHNOPHOBIA = event_trigger(
    expect=["animal.walked"], match={"class": "Arachnida", "order": "Araneae"}, threshold=1
)
LILIES = event_trigger(
    expect=["animal.ingested"],
    match_related={"prefect.resource.role": "meal", "genus": "Hemerocallis", "species": "fulva"},
    threshold=0,
    within=30,
)
ANIMAL_LOVER = event_trigger(expect=[], match={"kingdom": "Animalia"}, threshold=0, within=30)


# --- Covering (a11-a13) ---------------------------------------------------------------------


def test_a11_trigger_covers_or_not() -> None:
    assert ARACHNOPHOBIA.covers(spider_walked)
    assert not ARACHNOPHOBIA.covers(chonk_walked)
    assert LILIES.covers(nibbled)
    assert not LILIES.covers(chonk_walked)
    assert not LILIES.covers(gobbled)


def test_a12_match_related_list_is_and_across_specs() -> None:
    both = LILIES.model_copy(
        update={
            "match_related": [
                LILIES.match_related,
                parse_trigger(
                    {"posture": "Reactive", "match_related": {"prefect.resource.role": "meal"}}
                ).match_related,  # type: ignore[union-attr]
            ]
        }
    )
    assert both.covers(nibbled)
    # Copies re-derive their precomputed matching state from the updated fields.
    narcissus = ResourceSpecification({"genus": "Narcissus"})
    assert not LILIES.model_copy(update={"match_related": [narcissus]}).covers(nibbled)
    assert LILIES.model_copy(update={"expect": frozenset({"x"})}).event_pattern.pattern == "x"

    def with_related(*specs: dict[str, str]) -> EventTrigger:
        return event_trigger(expect=["animal.ingested"], match_related=list(specs))

    hemerocallis = {"prefect.resource.role": "meal", "genus": "Hemerocallis"}
    assert with_related(hemerocallis, {"prefect.resource.role": "meal", "genus": "Tulipa"}).covers(
        nibbled
    )
    assert not with_related(
        hemerocallis, {"prefect.resource.role": "meal", "genus": "Narcissus"}
    ).covers(nibbled)


def test_a13_empty_expect_covers_all_events() -> None:
    assert ANIMAL_LOVER.covers(spider_walked)
    assert ANIMAL_LOVER.covers(nibbled)
    assert ANIMAL_LOVER.expects("anything.at.all")
    assert not ANIMAL_LOVER.covers(event("x", 1, {"prefect.resource.id": "rock"}))


def test_covers_uses_start_anchored_regex_with_one_or_more_wildcard() -> None:
    prefix = event_trigger(expect=["foo"])
    assert prefix.covers(event("foobar", 1, SPIDER))  # anchored at the start only
    flows = event_trigger(expect=["prefect.flow-run.*"])
    assert flows.covers(event("prefect.flow-run.Failed", 1, SPIDER))
    assert not flows.covers(event("prefect.flow-run.", 1, SPIDER))  # `*` needs a character
    after = event_trigger(expect=["b.*"], after=["a.start"])
    assert after.covers(event("a.start", 1, SPIDER))
    assert after.event_pattern.pattern == r"a\.start|b\..+"


def test_expects_and_starts_after() -> None:
    trigger = event_trigger(expect=["animal.*", "!animal.walked"], after=["start.*"])
    assert trigger.expects("animal.walked")  # "animal.*" accepts it: candidates are OR-ed
    assert trigger.expects("plant.grew")  # "!animal.walked" accepts it
    assert trigger.starts_after("start.now")
    assert not trigger.starts_after("stop.now")
    assert not event_trigger().starts_after("anything")


def test_bucketing_key_and_triggering_labels() -> None:
    trigger = event_trigger(for_each=["species", "related:meal:genus", "missing"])
    key = trigger.bucketing_key(nibbled)
    assert key == ("", "Hemerocallis", "monax")  # sorted labels; missing -> ""
    assert trigger.triggering_labels(key) == {
        "missing": "",
        "related:meal:genus": "Hemerocallis",
        "species": "monax",
    }
    assert event_trigger().bucketing_key(nibbled) == ()


@pytest.mark.parametrize(
    "labels",
    [
        ["species"],
        ["species", "genus", "missing"],
        ["related:meal:genus"],
        ["related:genus", "related:meal:missing", "meal:genus"],
        ["a:related:genus", "related:nope:species"],
    ],
)
def test_bucketing_key_reads_labels_as_find_resource_label_does(labels: list[str]) -> None:
    """The key of a trigger without `related:` labels is read from the primary resource
    directly; either way it must be what `Event.find_resource_label` says."""
    key = event_trigger(for_each=labels).bucketing_key(nibbled)
    assert key == tuple(nibbled.find_resource_label(label) or "" for label in sorted(labels))


def test_thresholds_and_immediacy() -> None:
    reactive = event_trigger(threshold=3)
    assert reactive.immediate
    assert reactive.meets_threshold(3)
    assert not reactive.meets_threshold(2)
    proactive = event_trigger(posture="Proactive", threshold=3, within=60)
    assert not proactive.immediate
    assert proactive.meets_threshold(2)
    assert not proactive.meets_threshold(3)
    assert not event_trigger(within=1).immediate
    assert event_trigger(threshold=-5).threshold == -5  # no range check, as in Prefect


# --- Validation (a14) -----------------------------------------------------------------------


def trigger_error(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        parse_trigger(data)
    return str(exc.value)


def compound(require: int | str, n: int) -> dict[str, Any]:
    child = {"type": "event", "posture": "Reactive"}
    return {"type": "compound", "triggers": [child] * n, "require": require, "within": None}


def test_a14_compound_require_at_least_one() -> None:
    assert "require must be at least 1" in trigger_error(compound(0, 2))


def test_a14_compound_require_at_most_the_number_of_triggers() -> None:
    message = "require must be less than or equal to the number of triggers"
    assert message in trigger_error(compound(3, 2))
    assert parse_trigger(compound(2, 2)).num_expected_firings == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("require", "expected"), [("any", 1), ("all", 3), (2, 2)], ids=["any", "all", "int"]
)
def test_num_expected_firings(require: int | str, expected: int) -> None:
    trigger = parse_trigger(compound(require, 3))
    assert isinstance(trigger, CompoundTrigger)
    assert trigger.num_expected_firings == expected


@pytest.mark.parametrize("within", [-0.001, -1, -10, timedelta(seconds=-1)])
def test_a14_within_negative_reactive(within: Any) -> None:
    assert "greater than or equal to 0 seconds" in trigger_error(
        {"posture": "Reactive", "within": within}
    )


@pytest.mark.parametrize("posture", ["Reactive", "Proactive"])
def test_within_past_a_hundred_years_is_refused(posture: str) -> None:
    """Longer windows would end past the dates trigd can compute with."""
    assert "less than or equal to 36525 days" in trigger_error(
        {"posture": posture, "within": 31 * 10**9}  # about 1,000 years
    )
    assert "less than or equal to 36525 days" in trigger_error(
        {"type": "compound", "triggers": [], "require": "all", "within": "P36526D"}
    )


@pytest.mark.parametrize("within", [-0.001, -1, -10, 1, 9, 9.999999, timedelta(seconds=9)])
def test_a14_within_too_small_proactive(within: Any) -> None:
    message = "`within` for Proactive triggers must be greater than or equal to 10 seconds"
    assert message in trigger_error({"posture": "Proactive", "within": within})


@pytest.mark.parametrize("posture", ["Reactive", "Proactive"])
def test_a14_within_none(posture: str) -> None:
    assert "`within` should be a valid timedelta" in trigger_error(
        {"posture": posture, "within": None}
    )


def test_a14_within_defaults() -> None:
    assert event_trigger().within == timedelta(0)
    assert event_trigger(posture="Proactive").within == timedelta(seconds=10)
    assert event_trigger(posture="Proactive", within=0).within == timedelta(seconds=10)
    assert event_trigger(posture="Proactive", within=10).within == timedelta(seconds=10)
    assert event_trigger(posture="Proactive", within="PT90S").within == timedelta(seconds=90)
    assert event_trigger(within=2.5).within == timedelta(seconds=2.5)


def test_a14_within_error_names_the_field() -> None:
    with pytest.raises(ValidationError) as exc:
        parse_trigger({"posture": "Proactive", "within": 5})
    assert exc.value.errors()[0]["loc"][-1] == "within"


def test_a14_metric_posture_rejected() -> None:
    assert "Input should be 'Reactive' or 'Proactive'" in trigger_error({"posture": "Metric"})
    assert "unsupported trigger type 'metric'" in trigger_error({"type": "metric"})


def test_a14_posture_is_required_on_the_server() -> None:
    assert "posture\n  Field required" in trigger_error({"type": "event"})


def test_a14_compound_children_without_type_are_event_triggers() -> None:
    document = {
        "name": "compound",
        "trigger": {
            "type": "compound",
            "require": "all",
            "within": 60,
            "triggers": [
                {
                    "posture": "Reactive",
                    "expect": ["prefect.flow-run.Failed"],
                    "match": {"prefect.resource.id": "prefect.flow-run.*"},
                    "threshold": 1,
                    "within": 0,
                },
                {"posture": "Reactive", "expect": ["x"], "threshold": 1, "within": 0},
            ],
        },
        "actions": [{"type": "do-nothing"}],
    }
    automation = Automation.model_validate_json(json.dumps(document))
    assert isinstance(automation.trigger, CompoundTrigger)
    assert all(isinstance(t, EventTrigger) for t in automation.trigger.triggers)
    assert automation.trigger.within == timedelta(seconds=60)


def test_discriminator_fallback_without_type() -> None:
    child = {"posture": "Reactive"}
    assert isinstance(
        parse_trigger({"triggers": [child], "require": 1, "within": None}), CompoundTrigger
    )
    assert isinstance(parse_trigger({"triggers": [child], "within": None}), SequenceTrigger)
    assert isinstance(parse_trigger(child), EventTrigger)


def test_composite_within_key_is_required_and_nullable() -> None:
    assert "within\n  Field required" in trigger_error({"type": "sequence", "triggers": []})
    sequence = parse_trigger({"type": "sequence", "triggers": [], "within": None})
    assert isinstance(sequence, SequenceTrigger)
    assert sequence.within is None


# --- JSON shapes ----------------------------------------------------------------------------


def test_trigger_json_shape() -> None:
    trigger = event_trigger(
        id="0b7e2f10-6a9d-4c1e-8f3a-1d2c3b4a5e6f",
        expect=["b", "a"],
        for_each=["z", "prefect.resource.id"],
        posture="Proactive",
        within=90,
    )
    assert json.loads(trigger.model_dump_json()) == {
        "type": "event",
        "id": "0b7e2f10-6a9d-4c1e-8f3a-1d2c3b4a5e6f",
        "match": {},
        "match_related": {},
        "after": [],
        "expect": ["a", "b"],
        "for_each": ["prefect.resource.id", "z"],
        "posture": "Proactive",
        "threshold": 1,
        "within": 90.0,
    }
    assert list(json.loads(trigger.model_dump_json())) == [
        "type", "id", "match", "match_related", "after", "expect", "for_each", "posture",
        "threshold", "within",
    ]  # fmt: skip
    composite = parse_trigger(compound("all", 1) | {"within": 300})
    assert list(json.loads(composite.model_dump_json())) == [
        "type", "id", "triggers", "within", "require",
    ]  # fmt: skip
    assert json.loads(composite.model_dump_json())["within"] == 300.0


# --- Actions --------------------------------------------------------------------------------


def automation_doc(**fields: Any) -> dict[str, Any]:
    return {
        "name": "pump pressure burst",
        "trigger": {"type": "event", "posture": "Reactive", "expect": ["pump.pressure.high"]},
        "actions": [{"type": "do-nothing"}],
    } | fields


def automation_error(**fields: Any) -> str:
    with pytest.raises(ValidationError) as exc:
        Automation.model_validate(automation_doc(**fields))
    return str(exc.value)


def test_unsupported_action_type_names_it_and_lists_supported() -> None:
    message = automation_error(actions=[{"type": "run-deployment", "source": "inferred"}])
    assert "unsupported action type 'run-deployment'" in message
    assert "'call-webhook', 'do-nothing'" in message
    assert "'call-webhook', 'do-nothing'" in automation_error(actions=[{"url": "http://x"}])
    assert "unsupported action type 'pause-work-pool'" in automation_error(
        actions_on_trigger=[{"type": "pause-work-pool"}]
    )


def test_call_webhook_fields_and_defaults() -> None:
    automation = Automation.model_validate(
        automation_doc(actions=[{"type": "call-webhook", "url": "https://example.com/hook"}])
    )
    action = automation.actions[0]
    assert isinstance(action, CallWebhook)
    assert json.loads(action.model_dump_json()) == {
        "type": "call-webhook",
        "url": "https://example.com/hook",
        "method": "POST",
        "headers": {},
        "payload": "",
        "secret": None,
        "timeout": None,
    }
    full = CallWebhook.model_validate(
        {
            "url": "http://127.0.0.1:9000/hooks/pager",
            "method": "put",
            "headers": {"X-Team": "ops"},
            "payload": '{"text": "{{ automation.name }}: {{ event.resource.id }}"}',
            "secret": "whsec_abc",
            "timeout": 2.5,
        }
    )
    assert (full.method, full.headers, full.secret, full.timeout) == (
        "PUT",
        {"X-Team": "ops"},
        "whsec_abc",
        2.5,
    )


@pytest.mark.parametrize("url", ["ftp://example.com/", "example.com/hook", "http://", ""])
def test_call_webhook_needs_an_http_url(url: str) -> None:
    assert "url must be an absolute http:// or https:// URL" in automation_error(
        actions=[{"type": "call-webhook", "url": url}]
    )
    assert "url\n  Field required" in automation_error(actions=[{"type": "call-webhook"}])


def test_object_payload_becomes_indented_json_string() -> None:
    action = CallWebhook.model_validate(
        {"url": "http://h/", "payload": {"message": "{{ event.event }}", "n": [1, "é"]}}
    )
    assert (
        action.payload == '{\n  "message": "{{ event.event }}",\n  "n": [\n    1,\n    "é"\n  ]\n}'
    )


def test_template_syntax_is_checked_only_for_templates() -> None:
    assert "'payload' is not a valid template" in automation_error(
        actions=[{"type": "call-webhook", "url": "http://h/", "payload": "{{ unclosed"}]
    )
    plain = CallWebhook.model_validate({"url": "http://h/", "payload": "{# not a template }"})
    assert plain.payload == "{# not a template }"


def test_template_loop_limits() -> None:
    ten = "{% for i in x %}{% endfor %}" * 10
    CallWebhook.model_validate({"url": "http://h/", "payload": ten})
    with pytest.raises(ValidationError, match="Contains 11 for loops"):
        CallWebhook.model_validate(
            {"url": "http://h/", "payload": ten + "{% for i in x %}{% endfor %}"}
        )
    two = "{% for a in x %}{% for b in a %}{{ b }}{% endfor %}{% endfor %}"
    CallWebhook.model_validate({"url": "http://h/", "payload": two})
    three = "{% for a in x %}" + two + "{% endfor %}"
    with pytest.raises(ValidationError, match="nested for loops at a depth of 3"):
        CallWebhook.model_validate({"url": "http://h/", "payload": three})


# --- Automation, stable ids and fingerprints ------------------------------------------------

NESTED = {
    "name": "nested",
    "trigger": {
        "type": "compound",
        "require": "any",
        "within": None,
        "triggers": [
            {"posture": "Reactive", "expect": ["a"]},
            {
                "type": "sequence",
                "within": 30,
                "triggers": [
                    {"posture": "Reactive", "expect": ["b"]},
                    {"posture": "Proactive", "expect": ["c"]},
                ],
            },
        ],
    },
    "actions": [{"type": "do-nothing"}],
    "actions_on_trigger": [{"type": "call-webhook", "url": "http://h/"}],
}


def test_automation_defaults_and_json_shape() -> None:
    automation = Automation.model_validate(automation_doc(owner_resource=None))
    assert automation.id == uuid5(AUTOMATION_NAMESPACE, "pump pressure burst")
    assert automation.id == automation_id_for("pump pressure burst")
    assert (automation.description, automation.enabled, automation.tags) == ("", True, [])
    dumped = json.loads(automation.model_dump_json())
    assert list(dumped) == [
        "name", "description", "enabled", "tags", "trigger", "actions", "actions_on_trigger",
        "actions_on_resolve", "id", "created", "updated",
    ]  # fmt: skip
    assert dumped["created"] == dumped["updated"] == "1970-01-01T00:00:00Z"
    assert dumped["trigger"]["id"] == str(trigger_id_for(automation.id, "trigger"))


def test_automation_rejects_unknown_top_level_fields() -> None:
    assert "Extra inputs are not permitted" in automation_error(action=[{"type": "do-nothing"}])


def test_stable_trigger_ids_follow_position_paths() -> None:
    automation = Automation.model_validate(NESTED)
    paths = [automation.path_of(t.id) for t in automation.all_triggers()]
    assert paths == [
        "trigger",
        "trigger.triggers[0]",
        "trigger.triggers[1]",
        "trigger.triggers[1].triggers[0]",
        "trigger.triggers[1].triggers[1]",
    ]
    for trigger, path in zip(automation.all_triggers(), paths, strict=True):
        assert trigger.id == uuid5(automation.id, path)
    again = Automation.model_validate(NESTED)
    assert [t.id for t in again.all_triggers()] == [t.id for t in automation.all_triggers()]


def test_given_ids_are_kept() -> None:
    given_id = "8f7e3d1c-2b4a-4c5d-9e8f-7a6b5c4d3e2f"
    document = json.loads(json.dumps(NESTED))
    document["id"] = "11111111-2222-4333-8444-555555555555"
    document["trigger"]["triggers"][1]["triggers"][0]["id"] = given_id
    automation = Automation.model_validate(document)
    assert automation.id == UUID("11111111-2222-4333-8444-555555555555")
    ids = [t.id for t in automation.all_triggers()]
    assert ids[3] == UUID(given_id)
    assert ids[4] == uuid5(automation.id, "trigger.triggers[1].triggers[1]")


def test_built_triggers_get_stable_ids_too() -> None:
    trigger = event_trigger(expect=["x"])
    automation = Automation(name="built", trigger=trigger, actions=[DoNothing()])
    assert automation.trigger.id == trigger_id_for(automation_id_for("built"), "trigger")
    assert isinstance(automation.trigger, EventTrigger)
    assert automation.trigger.expect == {"x"}
    assert trigger.id != automation.trigger.id  # the defaulted uuid4 was replaced


def test_duplicate_trigger_ids_are_rejected() -> None:
    document = json.loads(json.dumps(NESTED))
    same = "8f7e3d1c-2b4a-4c5d-9e8f-7a6b5c4d3e2f"
    document["trigger"]["triggers"][0]["id"] = same
    document["trigger"]["triggers"][1]["triggers"][1]["id"] = same
    with pytest.raises(ValidationError, match="is used by more than one trigger"):
        Automation.model_validate(document)


def test_parents_and_trigger_kinds() -> None:
    automation = Automation.model_validate(NESTED)
    top, first, sequence, second, third = automation.all_triggers()
    assert automation.parent_of(top.id) is automation
    assert automation.parent_of(first.id) == top
    assert automation.parent_of(second.id) == sequence
    assert automation.parent_of(third.id) == sequence
    assert automation.event_triggers() == [first, second, third]
    assert automation.trigger_by_id(third.id) == third
    assert automation.trigger_by_id(uuid4()) is None
    assert isinstance(sequence, SequenceTrigger)
    assert sequence.expected_firing_order == [second.id, third.id]
    assert [a.type for a in automation.all_actions()] == ["do-nothing", "call-webhook"]
    with pytest.raises(KeyError):
        automation.parent_of(uuid4())


def test_fingerprints_change_only_with_content() -> None:
    before = Automation.model_validate(NESTED)
    changed = json.loads(json.dumps(NESTED))
    changed["trigger"]["triggers"][1]["triggers"][1]["threshold"] = 2
    changed["description"] = "edited"
    after = Automation.model_validate(changed)
    old = {t.id: t.fingerprint() for t in before.all_triggers()}
    new = {t.id: t.fingerprint() for t in after.all_triggers()}
    assert old.keys() == new.keys()
    # The edited leaf and its ancestors changed; its siblings did not.
    unchanged = [old[t.id] == new[t.id] for t in before.all_triggers()]
    assert unchanged == [False, True, False, True, False]


def test_fingerprint_ignores_own_id_and_set_order() -> None:
    a = event_trigger(expect=["x", "y"], for_each=["b", "a"])
    b = event_trigger(expect=["y", "x"], for_each=["a", "b"], id=uuid4())
    assert a.id != b.id
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != event_trigger(expect=["x"]).fingerprint()


# --- Round trips ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(automations)
def test_automation_json_round_trip(automation: Automation) -> None:
    again = Automation.model_validate_json(automation.model_dump_json())
    assert again == automation
    assert again.model_dump_json() == automation.model_dump_json()
    assert [t.fingerprint() for t in again.all_triggers()] == [
        t.fingerprint() for t in automation.all_triggers()
    ]
    assert [t.id for t in again.all_triggers()] == [t.id for t in automation.all_triggers()]


@settings(max_examples=60, deadline=None)
@given(triggers)
def test_trigger_round_trip_keeps_fingerprint(trigger: TriggerTypes) -> None:
    again = parse_trigger(trigger.model_dump_json())
    assert again == trigger
    assert again.fingerprint() == trigger.fingerprint()
    assert again.id == trigger.id


# --- Loading files --------------------------------------------------------------------------


def test_loads_the_spec_example(tmp_path: Path) -> None:
    (tmp_path / "automations.yaml").write_text(PUMP_YAML)
    loaded_at = datetime(2026, 1, 1, tzinfo=UTC)
    (automation,) = load_automation_files([tmp_path / "automations.yaml"], loaded_at=loaded_at)
    assert automation.name == "pump pressure burst"
    assert automation.id == automation_id_for("pump pressure burst")
    assert automation.created == automation.updated == loaded_at
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert (trigger.posture, trigger.threshold, trigger.within) == (
        Posture.Reactive,
        3,
        timedelta(seconds=60),
    )
    action = automation.actions[0]
    assert isinstance(action, CallWebhook)
    assert action.secret == "whsec_abc"


def test_loads_json_single_objects_globs_and_directories(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(automation_doc(name="a")))
    (tmp_path / "b.yml").write_text(PUMP_YAML)
    (tmp_path / "ignored.txt").write_text("not an automation")
    (tmp_path / "empty.yaml").write_text("")
    by_glob = load_automation_files([str(tmp_path / "*.json"), str(tmp_path / "*.yml")])
    assert [a.name for a in by_glob] == ["a", "pump pressure burst"]
    by_dir = load_automation_files([tmp_path])
    assert sorted(a.name for a in by_dir) == ["a", "pump pressure burst"]
    mtime = datetime.fromtimestamp((tmp_path / "a.json").stat().st_mtime, UTC)
    assert by_dir[0].updated == mtime


def test_loader_errors_name_file_automation_and_field(tmp_path: Path) -> None:
    bad = """\
- name: pump burst
  trigger: {type: event, posture: Proactive, within: 5}
  actions: [{type: run-deployment}]
- description: no name at all
  trigger: {type: compound, require: 3, within: null, triggers: [{posture: Reactive}]}
  actions: []
- name: fine
  trigger: {posture: Reactive}
  actions: []
"""
    (tmp_path / "automations.yaml").write_text(bad)
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([tmp_path / "automations.yaml"])
    f = tmp_path / "automations.yaml"
    assert exc.value.problems == (
        f"{f}:2: automation 'pump burst': trigger.within: "
        "`within` for Proactive triggers must be greater than or equal to 10 seconds",
        f"{f}:3: automation 'pump burst': actions[0]: unsupported action type 'run-deployment'; "
        "supported types: 'call-webhook', 'do-nothing'",
        f"{f}:4: automation #1: name: Field required",
        f"{f}:5: automation #1: trigger.require: "
        "require must be less than or equal to the number of triggers",
    )
    assert str(exc.value) == "\n".join(exc.value.problems)


def test_loader_nested_field_paths(tmp_path: Path) -> None:
    document = json.loads(json.dumps(NESTED))
    document["trigger"]["triggers"][1]["triggers"][0]["within"] = -1
    document["actions_on_trigger"][0]["url"] = "nope"
    (tmp_path / "n.json").write_text(json.dumps([document]))
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([tmp_path / "n.json"])
    assert [p.split(": ")[2] for p in exc.value.problems] == [
        "trigger.triggers[1].triggers[0].within",
        "actions_on_trigger[0].url",
    ]


def test_loader_rejects_duplicate_names_and_ids(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(PUMP_YAML)
    (tmp_path / "two.json").write_text(
        json.dumps(
            [
                automation_doc(),
                automation_doc(name="other", id=str(automation_id_for("pump pressure burst"))),
            ]
        )
    )
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([tmp_path / "one.yaml", tmp_path / "two.json"])
    first, second = exc.value.problems
    assert first.startswith(f"{tmp_path / 'two.json'}:1: automation 'pump pressure burst': name: ")
    assert f"also used in {tmp_path / 'one.yaml'}" in first
    assert second.startswith(f"{tmp_path / 'two.json'}:1: automation 'other': id: ")


def test_loader_reports_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("- name: [unclosed\n")
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files(
            [tmp_path / "broken.yaml", tmp_path / "scalar.json", tmp_path / "missing.yaml",
             str(tmp_path / "none-*.yaml")]
        )  # fmt: skip
    problems = exc.value.problems
    assert len(problems) == 4
    assert any(
        re.match(rf"{re.escape(str(tmp_path / 'missing.yaml'))}: no such file", p) for p in problems
    )
    assert any(p.endswith("none-*.yaml: no files match") for p in problems)
    assert any(
        p == f"{tmp_path / 'scalar.json'}:1: a file must hold an automation, a list of "
        "automations or {automations: [...]}"
        for p in problems
    )
    assert any(p.startswith(f"{tmp_path / 'broken.yaml'}:2: invalid YAML: ") for p in problems)


# --- headers that would break the request -----------------------------------------------------

HIDDEN = "s3cr3t-v4lue"  # a header value: never repeated in an error


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("Content-Length", "12", "frames the body itself"),
        ("transfer-encoding", "chunked", "frames the body itself"),
        ("TE", "trailers", "frames the body itself"),
        ("Trailer", "X-A", "frames the body itself"),
        ("HOST", "evil.example", "sets it from the url"),
        ("Connection", "close", "manages its connections"),
        ("Keep-Alive", "timeout=5", "manages its connections"),
        ("Upgrade", "websocket", "manages its connections"),
        ("Proxy-Authorization", HIDDEN, "does not use a proxy"),
        ("webhook-signature", "v1,abc", "sets it to sign the request"),
        ("Webhook-Id", "x", "sets it to sign the request"),
        ("webhook-timestamp", "1", "sets it to sign the request"),
        ("X-Token", f"{HIDDEN}\r\nX-Injected: 1", "printable ASCII"),
        ("X-Token", f"{HIDDEN}\n", "printable ASCII"),
        ("X-Token", f"{HIDDEN}\x00", "printable ASCII"),
        ("X-Token", f" {HIDDEN}", "leading or trailing whitespace"),
        ("X-Token", f"{HIDDEN}é", "printable ASCII"),
        ("X Token", HIDDEN, "not a valid header name"),
        ("X-Token\r\nX-Injected", HIDDEN, "not a valid header name"),
        ("X-Token:", HIDDEN, "not a valid header name"),
        ("", HIDDEN, "not a valid header name"),
    ],
)
def test_loader_refuses_headers_that_break_the_request(
    tmp_path: Path, name: str, value: str, why: str
) -> None:
    hook = {"type": "call-webhook", "url": "https://e.com/h", "headers": {"X-Fine": "ok"}}
    document = automation_doc(
        actions=[{"type": "do-nothing"}],
        actions_on_trigger=[{**hook, "headers": {"X-Fine": "ok", name: value}}],
    )
    file = tmp_path / "a.json"
    file.write_text(json.dumps([document]))
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([file])
    [problem] = exc.value.problems
    prefix = f"{file}:1: automation 'pump pressure burst': actions_on_trigger[0].headers: header "
    assert problem.startswith(f"{prefix}{name!r}"), problem
    assert why in problem
    assert HIDDEN not in problem
    assert HIDDEN not in str(exc.value)


def test_headers_an_endpoint_may_use_are_kept() -> None:
    headers = {
        "Authorization": "Bearer abc.def",
        "Content-Type": "application/cloudevents+json",
        "X-Api-Key": 'k=v; q="a b"\tc',
        "User-Agent": "edge/1",
    }
    action = CallWebhook(url="https://e.com/h", headers=headers)
    assert action.headers == headers


def test_a_refused_header_in_a_validation_error_does_not_show_its_value() -> None:
    with pytest.raises(ValidationError) as exc:
        CallWebhook.model_validate({"url": "https://e.com/h", "headers": {"X-T": f"{HIDDEN}\n"}})
    assert HIDDEN not in str(exc.value)
    with pytest.raises(ValidationError) as exc:
        Automation.model_validate(
            automation_doc(actions=[{"type": "call-webhook", "url": "nope", "secret": HIDDEN}])
        )
    assert HIDDEN not in str(exc.value)


# --- Strict files: unknown keys, lines, Prefect's forms -------------------------------------

STRICT_YAML = """\
automations:
  - name: door watch
    tagz: [doors]
    trigger:
      type: sequence
      for_each: [prefect.resource.id]
      within: 1h30m
      triggers:
        - posture: Reactive
          expcet: [door.opened]
        - type: compound
          require: any
          within: null
          triggers:
            - posture: Proactive
              expect: [door.closed]
              matchh: {"prefect.resource.id": "door.*"}
    actions:
      - type: call-webhook
        url: https://hooks.example.com/in
        header: {X-Team: ops}
        paylod: hi
        secrett: whsec_not_shown
      - type: do-nothing
        url: https://hooks.example.com/in
"""


def load_problems(tmp_path: Path, text: str, name: str = "a.yaml") -> tuple[Path, list[str]]:
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([file])
    return file, list(exc.value.problems)


def test_every_unknown_key_at_any_depth_is_an_error_with_its_line(tmp_path: Path) -> None:
    file, problems = load_problems(tmp_path, STRICT_YAML)
    where = f"{file}:{{}}: automation 'door watch': "
    assert sorted(problems) == sorted(
        [
            where.format(3) + "tagz: unknown key (did you mean 'tags'?)",
            where.format(6) + "trigger.for_each: unknown key: sequence triggers have no "
            "'for_each', event triggers do (put it on the child triggers)",
            where.format(10) + "trigger.triggers[0].expcet: unknown key (did you mean 'expect'?)",
            where.format(17) + "trigger.triggers[1].triggers[0].matchh: unknown key "
            "(did you mean 'match'?)",
            where.format(21) + "actions[0].header: unknown key (did you mean 'headers'?)",
            where.format(22) + "actions[0].paylod: unknown key (did you mean 'payload'?)",
            where.format(23) + "actions[0].secrett: unknown key (did you mean 'secret'?)",
            where.format(25) + "actions[1].url: unknown key; a do-nothing action has: type",
        ]
    )
    assert "whsec_not_shown" not in "\n".join(problems)


def test_an_unknown_key_with_no_close_match_lists_the_known_ones(tmp_path: Path) -> None:
    _, [problem] = load_problems(
        tmp_path, "name: x\ntrigger: {posture: Reactive, zzz: 1}\nactions: []\n"
    )
    assert problem.endswith(
        ":2: automation 'x': trigger.zzz: unknown key; an event trigger has: type, id, match, "
        "match_related, after, expect, for_each, posture, threshold, within"
    )


def test_an_unknown_key_in_a_trigger_built_in_code_is_refused() -> None:
    with pytest.raises(ValidationError, match="expcet"):
        parse_trigger({"posture": "Reactive", "expcet": ["a"]})
    with pytest.raises(ValidationError, match="paylod"):
        CallWebhook.model_validate({"url": "https://e.com/h", "paylod": "x"})


def test_prefect_automations_wrapper_loads_every_automation(tmp_path: Path) -> None:
    file = tmp_path / "prefect.yaml"
    file.write_text(
        "automations:\n"
        "  - name: one\n"
        "    trigger: {posture: Reactive, expect: [a]}\n"
        "    actions: [{type: do-nothing}]\n"
        "  - name: two\n"
        "    trigger: {posture: Proactive, expect: [b], within: 5m}\n"
        "    actions: [{type: do-nothing}]\n"
    )
    one, two = load_automation_files([file])
    assert (one.name, two.name) == ("one", "two")
    assert two.trigger.within == timedelta(minutes=5)
    json_file = tmp_path / "prefect.json"
    json_file.write_text(json.dumps({"automations": [automation_doc()]}))
    assert [a.name for a in load_automation_files([json_file])] == ["pump pressure burst"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "automations: []\nname: x\n",
            ":2: name: unknown key; a file with an 'automations' list holds only it",
        ),
        ("automations: {name: x}\n", ":1: automations: must be a list"),
        (
            "- name: x\n  trigger: {posture: Reactive}\n  actions: []\n- 2\n",
            ":4: automation #1: (automation): Input should be a valid dictionary",
        ),
        ("just text\n", ":1: a file must hold an automation, a list of automations or "),
    ],
)
def test_file_shapes_that_are_not_automations(tmp_path: Path, text: str, problem: str) -> None:
    file, [reported] = load_problems(tmp_path, text)
    assert reported.startswith(f"{file}{problem}"), reported


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("PT15M", 900),
        ("90", 90),
        (90, 90),
        (0.5, 0.5),
        ("00:05:00", 300),  # pydantic's form, accepted before durations were
    ],
)
def test_within_takes_durations_as_the_config_does(written: str | float, seconds: float) -> None:
    trigger = event_trigger(within=written)
    assert trigger.within == timedelta(seconds=seconds)
    composite = parse_trigger({"type": "sequence", "within": written, "triggers": []})
    assert composite.within == timedelta(seconds=seconds)


def test_a_bad_within_says_which_forms_are_accepted(tmp_path: Path) -> None:
    _, problems = load_problems(
        tmp_path,
        "name: x\n"
        "trigger:\n"
        "  posture: Proactive\n"
        "  within: 5 minutes\n"
        "  triggers2: []\n"
        "actions: []\n",
    )
    assert any(
        ":4: automation 'x': trigger.within: expected a duration such as '90s', '15m' or "
        "'1h30m', got '5 minutes'" in p
        for p in problems
    ), problems
    _, [short] = load_problems(tmp_path, "name: x\ntrigger: {posture: Proactive, within: 5s}\n"
                               "actions: []\n")  # fmt: skip
    assert short.endswith(
        ":2: automation 'x': trigger.within: "
        "`within` for Proactive triggers must be greater than or equal to 10 seconds"
    )


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    file, [problem] = load_problems(
        tmp_path, "name: x\ntrigger:\n  posture: [Reactive\nactions: []\n"
    )
    assert problem.startswith(f"{file}:4: invalid YAML: while parsing a flow sequence from line 3")
    assert "<unicode string>" not in problem


def test_json_errors_name_the_line(tmp_path: Path) -> None:
    file, [problem] = load_problems(tmp_path, '{"name": "x",\n "trigger": }\n', "a.json")
    assert problem == f"{file}:2: invalid JSON: Expecting value (column 13)"


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "a.yaml"
    file.write_bytes(b"name: x\ndescription: caf\xe9\n")
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([file])
    assert exc.value.problems == (f"{file}:2: not UTF-8: invalid continuation byte at byte 24",)


@pytest.mark.parametrize("name", ["a.yaml", "a.json"])
def test_a_key_written_twice_is_an_error(tmp_path: Path, name: str) -> None:
    text = (
        '{"name": "x", "trigger": {"posture": "Reactive",\n'
        '  "expect": ["a"],\n  "expect": ["b"]}, "actions": []}\n'
    )
    file, [problem] = load_problems(tmp_path, text, name)
    assert problem == f"{file}:3: trigger.expect: duplicate key (first at line 2)"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    file = tmp_path / "a.yaml"
    file.write_text(
        "automations:\n"
        "  - name: x\n"
        "    trigger: &t {posture: Reactive, expect: [a]}\n"
        "    actions: []\n"
        "  - name: y\n"
        "    trigger: {<<: *t, expect: [b]}\n"
        "    actions: []\n"
    )
    _, y = load_automation_files([file])
    assert isinstance(y.trigger, EventTrigger)
    assert y.trigger.expect == frozenset({"b"})


def test_every_problem_of_a_valid_file_has_a_line(tmp_path: Path) -> None:
    """Problems found after validation (names, ids, references) carry a line too."""
    file = tmp_path / "a.yaml"
    file.write_text(
        "- name: x\n  trigger: {posture: Reactive}\n  actions: []\n"
        "- name: x\n  trigger: {posture: Reactive}\n  actions:\n"
        "    - {type: call-webhook, url: 'https://e.com/', secret: 'env:TRIGD_TEST_UNSET'}\n"
        "- name: y\n  id: " + str(automation_id_for("x")) + "\n"
        "  trigger: {posture: Reactive}\n  actions: []\n"
    )
    with pytest.raises(AutomationFileError) as exc:
        load_automation_files([file], environ={})
    assert [p.split(": ")[0:3] for p in exc.value.problems] == [
        [f"{file}:7", "automation 'x'", "actions[0].secret"],
        [f"{file}:9", "automation 'y'", "id"],
    ]
