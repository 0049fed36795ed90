"""Which loaded EventTriggers might care about an event
(docs/TRIGGERS.md#which-triggers-see-an-event).

Theory of operation: every trigger is indexed under each pattern of `expect | after`, or
under `"*"` when `expect` is empty. A pattern without glob characters can only fnmatch the
identical name, so those live in a dict; the others are tried with `fnmatchcase`.

Everything that depends on the name alone is decided once per name and cached (event
names repeat a lot; the cache is bounded and rebuilt on every load): `for_name` keeps the
indexed triggers that pass the start-anchored name regex, each with what `expects` and
`starts_after` say of that name, so per event only the resource specifications are left
(`covers_resources`). The cost per event therefore does not grow with triggers whose
patterns cannot match its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Final, NamedTuple

from daemon.core.automations import EventTrigger
from daemon.core.events import Event

CATCH_ALL: Final = "*"
NAME_CACHE_SIZE: Final = 4_096
"""Distinct event names whose candidate lists are kept (entries)."""

_GLOB_CHARS: Final = frozenset("*?[")


def index_patterns(trigger: EventTrigger) -> frozenset[str]:
    """The index keys of one trigger."""
    if not trigger.expect:
        return frozenset({CATCH_ALL})
    return trigger.expect | trigger.after


class Candidate(NamedTuple):
    """A trigger whose name pattern covers one event name, and what it says of the name."""

    trigger: EventTrigger
    position: int
    """Where the trigger came in the sequence the index was built from."""
    expects: bool
    starts_after: bool


class TriggerIndex:
    """An immutable pattern index over a set of EventTriggers."""

    def __init__(self, triggers: Iterable[EventTrigger]) -> None:
        self._triggers: tuple[EventTrigger, ...] = tuple(triggers)
        exact: dict[str, list[int]] = {}
        globbed: dict[str, list[int]] = {}
        for position, trigger in enumerate(self._triggers):
            for pattern in index_patterns(trigger):
                table = globbed if _GLOB_CHARS.intersection(pattern) else exact
                table.setdefault(pattern, []).append(position)
        self._exact = exact
        self._globbed = tuple((pattern, tuple(p)) for pattern, p in globbed.items())
        self._by_name: dict[str, tuple[Candidate, ...]] = {}

    def __len__(self) -> int:
        return len(self._triggers)

    @property
    def triggers(self) -> Sequence[EventTrigger]:
        return self._triggers

    def _positions(self, event_name: str) -> list[int]:
        """Triggers indexed under a pattern that fnmatches the name, in load order."""
        positions: set[int] = set(self._exact.get(event_name, ()))
        for pattern, members in self._globbed:
            if fnmatchcase(event_name, pattern):
                positions.update(members)
        return sorted(positions)

    def for_name(self, event_name: str) -> tuple[Candidate, ...]:
        """The candidates whose start-anchored name regex matches too, in load order."""
        cached = self._by_name.get(event_name)
        if cached is not None:
            return cached
        found = tuple(
            Candidate(t, p, t.expects(event_name), t.starts_after(event_name))
            for p in self._positions(event_name)
            if (t := self._triggers[p]).event_pattern.match(event_name)
        )
        if len(self._by_name) >= NAME_CACHE_SIZE:
            self._by_name.clear()
        self._by_name[event_name] = found
        return found

    def interested(self, event: Event) -> list[EventTrigger]:
        """`find_interested_triggers`: candidates that cover the event."""
        return [c.trigger for c in self.for_name(event.event) if c.trigger.covers_resources(event)]
