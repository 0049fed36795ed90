"""Payload templates (docs/DELIVERY.md#templates): sandbox, context, tojson, failures."""

from __future__ import annotations

import json

import pytest

from daemon.core.automations import Automation
from daemon.core.firings import TriggeredAction
from daemon.core.templates import (
    RenderFailed,
    render_template,
    template_context,
    tojson,
    trial_render,
    webhook_body,
)
from tests.support.webhook_receiver import make_triggered

URL = "http://127.0.0.1:9/hook"


def body(payload: str) -> str:
    return webhook_body(make_triggered({"type": "call-webhook", "url": URL, "payload": payload}))


def test_plain_strings_are_sent_verbatim() -> None:
    assert body("just { text } with {braces}") == "just { text } with {braces}"
    assert render_template("{ no template }", {}) == "{ no template }"


def test_empty_payload_sends_the_triggered_action_json() -> None:
    triggered = make_triggered({"type": "call-webhook", "url": URL})
    assert json.loads(webhook_body(triggered)) == json.loads(triggered.redacted().model_dump_json())


def test_object_payload_becomes_indented_json() -> None:
    triggered = make_triggered(
        {"type": "call-webhook", "url": URL, "payload": {"automation": "{{ automation.name }}"}}
    )
    assert webhook_body(triggered) == '{\n  "automation": "pump pressure burst"\n}'


def test_context_variables() -> None:
    rendered = body(
        "{{ automation.name }}|{{ event.event }}|{{ event.resource.id }}|"
        "{{ labels.prefect.resource.id }}|{{ labels['prefect.resource.id'] }}|"
        "{{ firing.trigger.type }}|{{ firings | length }}|{{ events[0].payload.bar }}|"
        "{{ event.resource.labels.site }}"
    )
    assert (
        rendered == "pump pressure burst|pump.pressure.high|pump.7|pump.7|pump.7|event|1|9.2|north"
    )


def test_missing_attributes_render_empty() -> None:
    assert body("[{{ event.nope.deeper }}][{{ nothing }}][{{ labels.absent.label }}]") == "[][][]"


def test_tojson_handles_models_and_labels() -> None:
    data = json.loads(body('{"event": {{ event | tojson }}, "labels": {{ labels | tojson }}}'))
    assert data["event"]["id"] == "2f0c2bde-3d0e-4c1f-9a61-6a2d2a8f3b10"
    assert data["event"]["resource"] == {"prefect.resource.id": "pump.7", "site": "north"}
    assert data["event"]["occurred"].endswith("Z")
    assert data["labels"] == {"prefect.resource.id": "pump.7"}
    assert tojson("<&>") == '"<&>"'  # not HTML-escaped: bodies are JSON, not HTML
    assert json.loads(tojson({"a": [1, 2]}, indent=2)) == {"a": [1, 2]}


def test_range_is_capped() -> None:
    assert body("{% for i in range(3) %}{{ i }}{% endfor %}") == "012"
    with pytest.raises(RenderFailed) as failure:
        body("{% for i in range(101) %}{{ i }}{% endfor %}")
    assert failure.value.reason.startswith("Template rendering failed: OverflowError(")
    assert failure.value.template_source == "{% for i in range(101) %}{{ i }}{% endfor %}"


@pytest.mark.parametrize(
    "source",
    [
        "{{ automation.tags.append(1) }}",  # immutable sandbox: no mutation
        "{{ 1 / 0 }}",
    ],
)
def test_unsafe_or_broken_templates_fail_cleanly(source: str) -> None:
    triggered = make_triggered({"type": "call-webhook", "url": URL})
    with pytest.raises(RenderFailed, match=r"^Template rendering failed: "):
        render_template(source, template_context(triggered))


def test_sandbox_hides_internals() -> None:
    assert body("[{{ event.__class__.__mro__ }}][{{ automation._parents }}]") == "[][]"


def test_loop_limits_are_checked_when_loading() -> None:
    nested = "{% for a in x %}{% for b in a %}{% for c in b %}{% endfor %}{% endfor %}{% endfor %}"
    with pytest.raises(ValueError, match="nested for loops"):
        make_triggered({"type": "call-webhook", "url": URL, "payload": nested})


# --- no secret in any body ---------------------------------------------------------------------

SECRETS = ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "Bearer pd-7f3c91", "tk-44d0", "sl-9a2e")


def two_hooks() -> TriggeredAction:
    """An automation calling two parties, each with its own secret, headers and a url whose
    path is a credential; the triggered action is the first one's."""
    base = make_triggered({"type": "do-nothing"})
    automation = Automation.model_validate(
        {
            **base.automation.model_dump(exclude={"actions", "id"}),
            "actions": [
                {
                    "type": "call-webhook",
                    "url": "https://events.pagerduty.example/v2/enqueue?token=tk-44d0",
                    "headers": {"Authorization": SECRETS[1]},
                    "secret": SECRETS[0],
                },
                {
                    "type": "call-webhook",
                    "url": "https://user:sl-9a2e@hooks.slack.example/services/sl-9a2e",
                    "headers": {"X-Token": "sl-9a2e", "X-Team": "ops"},
                    "secret": "sl-9a2e",
                },
            ],
        }
    )
    return base.model_copy(update={"automation": automation, "action": automation.actions[0]})


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "{{ automation.model_dump_json() }}",
        "{{ automation | tojson }}",
        "{{ automation.model_dump() }}",
        "{% for a in automation.actions %}{{ a.secret }} {{ a.headers }} {{ a.url }}{% endfor %}",
        "{{ automation.actions[1].headers['X-Token'] }}",
    ],
)
def test_no_body_holds_a_secret_header_value_or_url_token(payload: str) -> None:
    triggered = two_hooks()
    if payload:
        action = triggered.action.model_copy(update={"payload": payload})
        triggered = triggered.model_copy(update={"action": action})
    body = webhook_body(triggered)
    assert "*" in body
    for secret in SECRETS:
        assert secret not in body


def test_the_default_body_keeps_prefects_shape() -> None:
    triggered = two_hooks()
    sent = json.loads(webhook_body(triggered))
    full = json.loads(triggered.model_dump_json())

    def keys(value: object) -> object:
        if isinstance(value, dict):
            return {k: keys(v) for k, v in value.items()}
        if isinstance(value, list):
            return [keys(v) for v in value]
        return None

    assert keys(sent) == keys(full)
    assert sent["action"] == {
        **full["action"],
        "url": "https://events.pagerduty.example/********",
        "headers": {"Authorization": "********"},
        "secret": "********",
    }
    assert sent["automation"]["actions"][1]["url"] == "https://hooks.slack.example/********"
    assert sent["automation"]["actions"][1]["headers"] == {
        "X-Token": "********",
        "X-Team": "********",
    }
    # what a receiver parses back is still a valid document
    assert TriggeredAction.model_validate(sent).redacted() == TriggeredAction.model_validate(sent)


def test_the_trial_is_strict_where_deliveries_are_not() -> None:
    triggered = make_triggered({"type": "call-webhook", "url": URL, "payload": "{{ event.nope }}"})
    assert webhook_body(triggered) == ""  # deliveries keep Prefect's ChainableUndefined
    error = trial_render("{{ event.nope }}", triggered, sample=False)
    assert error is not None
    assert "has no attribute 'nope'" in error
    assert trial_render("{{ event.nope is defined }}", triggered, sample=False) is None
    assert trial_render("{{ event.payload.nope }}", triggered, sample=True) is None
    assert trial_render("no template", triggered, sample=False) is None
