"""Reading an outbox row's document (a `TriggeredAction` as JSON) back, once per delivery.

The sender reads every row it attempts. Most of a document's parse is its automation
(the trigger and its patterns, the actions and their templates), and in a storm every
row of one automation's action carries the same automation. So the automation is parsed
once per distinct JSON value (`_automation`, a memo of a pure function, keyed by the
automation re-encoded as compact JSON, so `1`, `1.0` and `true` stay distinct) and the
rest of the document is validated around it. A document this path cannot take (not an
object, no automation, invalid) is parsed as a whole, so its error is the one
`TriggeredAction.model_validate_json` gives.
"""

from __future__ import annotations

import functools
from typing import Final

import pydantic_core

from daemon.core.automations import Automation
from daemon.core.firings import TriggeredAction

AUTOMATIONS_REMEMBERED: Final = 256
"""Distinct automation values (automation and action, as redacted in documents) kept
parsed: a storm's actions, and more."""


@functools.lru_cache(maxsize=AUTOMATIONS_REMEMBERED)
def _automation(text: bytes) -> Automation:
    return Automation.model_validate_json(text)


def read_triggered(document: str | bytes) -> TriggeredAction:
    """The `TriggeredAction` of an outbox document; ValidationError as
    `TriggeredAction.model_validate_json(document)` raises it."""
    try:
        raw = pydantic_core.from_json(document)
        automation = _automation(pydantic_core.to_json(raw["automation"]))
        raw["automation"] = automation
        return TriggeredAction.model_validate(raw)
    except (ValueError, TypeError, KeyError):  # ValidationError is a ValueError
        return TriggeredAction.model_validate_json(document)
