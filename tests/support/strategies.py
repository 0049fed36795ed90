"""Hypothesis strategies for the round-trip properties: received events (tests/core/test_events.py,
tests/store/test_roundtrip.py) and automations with their triggers (tests/core/test_automations.py,
tests/store/test_roundtrip.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from daemon.core.automations import Automation, TriggerTypes, parse_trigger
from daemon.core.events import ReceivedEvent

# --- events ---------------------------------------------------------------------------------

label_text = st.text(min_size=1, max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
times = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([None, UTC]),
)


@st.composite
def resources(draw: st.DrawFn, role: bool = False) -> dict[str, str]:
    labels = draw(st.dictionaries(label_text, st.text(max_size=12), max_size=4))
    labels["prefect.resource.id"] = draw(label_text)
    if role:
        labels["prefect.resource.role"] = draw(label_text)
    return labels


@st.composite
def received_events(draw: st.DrawFn) -> ReceivedEvent:
    return ReceivedEvent.model_validate(
        {
            "occurred": draw(times),
            "event": draw(st.text(max_size=30)),
            "resource": draw(resources()),
            "related": draw(st.lists(resources(role=True), max_size=3)),
            "payload": draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
            "id": draw(st.uuids()),
            "follows": draw(st.none() | st.uuids()),
            "received": draw(times),
        }
    )


# --- automations ----------------------------------------------------------------------------

patterns = st.text(alphabet="abc.*!-", min_size=1, max_size=8)
specs = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.text(max_size=6) | st.lists(patterns, max_size=2),
    max_size=2,
)
event_triggers = st.builds(
    lambda **kw: parse_trigger({"type": "event", **kw}),
    match=specs,
    match_related=specs | st.lists(specs, max_size=2),
    after=st.sets(patterns, max_size=2).map(sorted),
    expect=st.sets(patterns, max_size=2).map(sorted),
    for_each=st.sets(patterns, max_size=2).map(sorted),
    posture=st.sampled_from(["Reactive", "Proactive"]),
    threshold=st.integers(-2, 5),
    within=st.sampled_from([0, 10, 10.5, 60, 3600.25]) | st.integers(10, 86400),
)


def composites(children: st.SearchStrategy[TriggerTypes]) -> st.SearchStrategy[TriggerTypes]:
    def build(
        kind: str, triggers: list[TriggerTypes], within: float | None, req: Any
    ) -> TriggerTypes:
        data: dict[str, Any] = {"type": kind, "triggers": triggers, "within": within}
        if kind == "compound":
            data["require"] = req if isinstance(req, str) else min(req, len(triggers))
        return parse_trigger(data)

    return st.builds(
        build,
        st.sampled_from(["compound", "sequence"]),
        st.lists(children, min_size=1, max_size=3),
        st.none() | st.floats(0, 1e6),
        st.sampled_from(["any", "all"]) | st.integers(1, 3),
    )


triggers = st.recursive(event_triggers, composites, max_leaves=6)
actions = st.sampled_from(
    [
        {"type": "do-nothing"},
        {"type": "call-webhook", "url": "http://127.0.0.1:9000/h", "payload": "{{ event.id }}"},
        {"type": "call-webhook", "url": "https://e.com", "headers": {"a": "b"}, "timeout": 3},
    ]
)
automations = st.builds(
    lambda **kw: Automation.model_validate(kw),
    name=st.text(min_size=1, max_size=20),
    description=st.text(max_size=10),
    enabled=st.booleans(),
    tags=st.lists(st.text(max_size=5), max_size=2),
    trigger=triggers,
    actions=st.lists(actions, max_size=2),
    actions_on_trigger=st.lists(actions, max_size=1),
    created=st.datetimes(timezones=st.just(UTC)),
)
