"""What ``GET /api/ready`` answers: a registry of named sources of reasons not to be ready.

Each source is a function returning the reasons it has now (none: ready as far as it
knows), read at each request: the store's (``store_trouble.TroubleBoard``: a task waiting
out store trouble), the service's tasks, and whatever a later task registers (an upstream
bridge reports there without failing readiness of the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

Source = Callable[[], Sequence[str]]


@attrs.define
class Readiness:
    _sources: dict[str, Source] = attrs.Factory(dict)
    _notes: dict[str, Source] = attrs.Factory(dict)

    def add(self, name: str, source: Source, *, failing: bool = True) -> None:
        """Register ``source`` under ``name`` (a reason reads ``name: reason``). A source
        that is not ``failing`` is reported among the reasons without making the daemon
        unready: the upstream bridge, whose outage does not stop local work."""
        (self._sources if failing else self._notes)[name] = source

    def reasons(self) -> list[str]:
        """The reasons not to be ready."""
        return _read(self._sources)

    def notes(self) -> list[str]:
        """The reasons reported that do not fail readiness."""
        return _read(self._notes)


def _read(sources: dict[str, Source]) -> list[str]:
    return [f"{name}: {why}" for name, source in sources.items() for why in source()]
