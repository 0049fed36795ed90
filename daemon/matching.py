"""Label matching and resource specifications (SEMANTICS §1.4, §3.1, §3.2).

The server's rules, not the client's: full-string, case-sensitive shell globs
(`fnmatch.fnmatchcase`), one leading `!` negates, and an absent label never matches,
not even a negated pattern.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Self

from pydantic import ConfigDict, RootModel

from daemon.events import RESOURCE_ID, Resource


def matches(expected: str, value: str | None) -> bool:
    """Does `value` satisfy the pattern `expected` (`*.csv`, `!s3://*`, `exact`)?"""
    if value is None:
        return False
    if expected.startswith("!"):
        return not fnmatchcase(value, expected[1:])
    return fnmatchcase(value, expected)


class ResourceSpecification(RootModel[dict[str, str | list[str]]]):
    """`{label: pattern | [pattern, ...]}`: AND across labels, OR within a label's list.

    The empty specification matches every resource.
    """

    model_config = ConfigDict(frozen=True)

    def model_post_init(self, context: object, /) -> None:
        # Normalised once, kept in __dict__ beside the fields: matching runs for every
        # candidate trigger of every event, and pydantic private attributes are slow to read.
        self.__dict__["_items"] = tuple(
            (label, (value,) if isinstance(value, str) else tuple(value))
            for label, value in self.root.items()
        )

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.model_post_init(None)  # the copy's derived state must follow its fields
        return copied

    @property
    def _items(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        items: tuple[tuple[str, tuple[str, ...]], ...] = self.__dict__["_items"]
        return items

    def matches(self, resource: Resource) -> bool:
        labels = resource.root
        for label, candidates in self._items:
            value = labels.get(label)
            if not any(matches(candidate, value) for candidate in candidates):
                return False
        return True

    def includes(self, candidates: Iterable[Resource]) -> bool:
        """True if the spec is empty, else if any candidate matches it."""
        if not self._items:
            return True
        return any(self.matches(candidate) for candidate in candidates)

    def matches_every_resource(self) -> bool:
        return not self.root

    def matches_every_resource_of_kind(self, prefix: str) -> bool:
        """Empty, or exactly `{prefect.resource.id: [..., "<prefix>.*", ...]}`."""
        if not self.root:
            return True
        if len(self.root) == 1 and RESOURCE_ID in self.root:
            return f"{prefix}.*" in self[RESOURCE_ID]
        return False

    def items(self) -> list[tuple[str, list[str]]]:
        """Every label with its candidates as a list (a scalar `""` stays `[""]`)."""
        return [(label, list(candidates)) for label, candidates in self._items]

    def __getitem__(self, label: str) -> list[str]:
        # Prefect's quirk, kept: a falsy value (`""` or `[]`) reads back as `[]`.
        return _as_list(self.root[label])

    def get(self, label: str, default: str | list[str] | None = None) -> list[str]:
        return _as_list(self.root.get(label, default))

    def __contains__(self, label: object) -> bool:
        return label in self.root

    def __len__(self) -> int:
        return len(self.root)


def _as_list(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)
