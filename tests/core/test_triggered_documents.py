"""Reading outbox documents back: the same TriggeredAction as a whole parse, its
automation parsed once per distinct value."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from daemon.core.automations import Automation
from daemon.core.events import ReceivedEvent
from daemon.core.firings import TriggeredAction
from daemon.core.triggered_documents import read_triggered
from tests.support.strategies import automations, received_events
from tests.support.webhook_receiver import make_triggered, triggered_by


@settings(max_examples=60, deadline=None)
@given(
    automations.filter(lambda a: bool(a.actions)),
    st.lists(received_events(), min_size=1, max_size=3),
    st.booleans(),
)
def test_a_document_reads_as_a_whole_parse_does(
    automation: Automation, events: list[ReceivedEvent], redact: bool
) -> None:
    for event in events:  # the second and later ones find the automation parsed already
        triggered = triggered_by(automation, event, len(automation.actions) - 1)
        document = (triggered.redacted() if redact else triggered).model_dump_json()
        assert read_triggered(document) == TriggeredAction.model_validate_json(document)


def test_rows_of_one_automation_share_its_parse() -> None:
    action = {"type": "call-webhook", "url": "http://127.0.0.1:9/h", "secret": "s"}
    first, second = make_triggered(action), make_triggered(action)
    a = read_triggered(first.model_dump_json())
    b = read_triggered(second.model_dump_json())
    assert a.id != b.id
    assert a.automation is b.automation
    other = make_triggered({**action, "url": "http://127.0.0.1:9/other"})
    assert read_triggered(other.model_dump_json()).automation is not a.automation


def test_values_equal_in_python_but_not_in_json_are_told_apart() -> None:
    """`1 == 1.0` in Python: the memo is keyed by JSON, where they differ."""
    text = make_triggered({"type": "do-nothing"}).model_dump_json()
    assert '"threshold":1,' in text
    one = read_triggered(text)
    one_point_oh = read_triggered(text.replace('"threshold":1,', '"threshold":1.0,'))
    assert one_point_oh.automation is not one.automation
    assert one_point_oh == TriggeredAction.model_validate_json(
        text.replace('"threshold":1,', '"threshold":1.0,')
    )


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[1, 2]",
        '{"automation": 1}',
        "{}",
        '{"automation": {"name": "x"}, "triggered": "2026-01-01T00:00:00Z"}',
    ],
)
def test_a_bad_document_fails_as_a_whole_parse_does(document: str) -> None:
    with pytest.raises(ValidationError) as expected:
        TriggeredAction.model_validate_json(document)
    with pytest.raises(ValidationError) as got:
        read_triggered(document)
    assert got.value.errors() == expected.value.errors()
