"""Which loaded EventTriggers might care about an event (SEMANTICS §3.4).

Theory of operation: every trigger is indexed under each pattern of `expect | after`, or
under `"*"` when `expect` is empty. A pattern without glob characters can only fnmatch the
identical name, so those live in a dict; the others are tried with `fnmatchcase`. The
candidates for a name are computed once and cached (event names repeat a lot; the cache
is bounded and rebuilt on every load), and `covers` then applies the start-anchored name
regex and the resource specifications. The cost per event therefore does not grow with
triggers whose patterns cannot match its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Final

from daemon.automations import EventTrigger
from daemon.events import Event

CATCH_ALL: Final = "*"
NAME_CACHE_SIZE: Final = 4_096
"""Distinct event names whose candidate lists are kept (entries)."""

_GLOB_CHARS: Final = frozenset("*?[")


def index_patterns(trigger: EventTrigger) -> frozenset[str]:
    """The index keys of one trigger."""
    if not trigger.expect:
        return frozenset({CATCH_ALL})
    return trigger.expect | trigger.after


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
        self._cache: dict[str, tuple[EventTrigger, ...]] = {}

    def __len__(self) -> int:
        return len(self._triggers)

    @property
    def triggers(self) -> Sequence[EventTrigger]:
        return self._triggers

    def candidates(self, event_name: str) -> tuple[EventTrigger, ...]:
        """Triggers indexed under a pattern that fnmatches the name, in load order."""
        cached = self._cache.get(event_name)
        if cached is not None:
            return cached
        positions: set[int] = set(self._exact.get(event_name, ()))
        for pattern, members in self._globbed:
            if fnmatchcase(event_name, pattern):
                positions.update(members)
        found = tuple(self._triggers[p] for p in sorted(positions))
        if len(self._cache) >= NAME_CACHE_SIZE:
            self._cache.clear()
        self._cache[event_name] = found
        return found

    def interested(self, event: Event) -> list[EventTrigger]:
        """`find_interested_triggers`: candidates that cover the event."""
        return [t for t in self.candidates(event.event) if t.covers(event)]
