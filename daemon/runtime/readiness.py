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

    def add(self, name: str, source: Source) -> None:
        """Register ``source`` under ``name`` (a reason reads ``name: reason``)."""
        self._sources[name] = source

    def reasons(self) -> list[str]:
        return [f"{name}: {why}" for name, source in self._sources.items() for why in source()]
