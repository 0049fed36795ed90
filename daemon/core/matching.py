"""Label matching and resource specifications (docs/TRIGGERS.md#label-patterns,
#resource-specifications).

The server's rules, not the client's: full-string, case-sensitive shell globs
(`fnmatch.fnmatchcase`), one leading `!` negates, and an absent label never matches,
not even a negated pattern.

Matching runs for every candidate trigger of every event, so the models compile their
patterns once (`compile_pattern`: the very regex `fnmatchcase` would build) and test them
with `compiled_matches`, which is `matches` without the per-call pattern lookup.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase, translate
from typing import Any, Final, Self

from pydantic import ConfigDict, RootModel

from daemon.core.events import RESOURCE_ID, Resource

CompiledPattern = tuple[bool, re.Pattern[str]]
"""(negated, regex of the glob): a pattern of `matches`, ready to test."""


def matches(expected: str, value: str | None) -> bool:
    """Does `value` satisfy the pattern `expected` (`*.csv`, `!s3://*`, `exact`)?"""
    if value is None:
        return False
    if expected.startswith("!"):
        return not fnmatchcase(value, expected[1:])
    return fnmatchcase(value, expected)


COMPILED_PATTERNS: Final = 4096
"""Patterns whose compiled form is remembered: a trigger is parsed again with every
outbox row that carries it (the sender reads each row's document), and `translate` costs
more than the rest of the parse."""


@functools.lru_cache(maxsize=COMPILED_PATTERNS)
def compile_pattern(expected: str) -> CompiledPattern:
    """`expected` as `compiled_matches` takes it; `fnmatchcase` matches with this regex."""
    negated = expected.startswith("!")
    return negated, re.compile(translate(expected[1:] if negated else expected))


def compiled_matches(patterns: Iterable[CompiledPattern], value: str | None) -> bool:
    """Does `value` satisfy any of the patterns (`matches` of each, or'ed)?"""
    if value is None:
        return False
    for negated, regex in patterns:  # a loop, not any(): this runs for every event
        if (regex.match(value) is None) is negated:
            break
    else:
        return False
    return True


class ResourceSpecification(RootModel[dict[str, str | list[str]]]):
    """`{label: pattern | [pattern, ...]}`: AND across labels, OR within a label's list.

    The empty specification matches every resource.
    """

    model_config = ConfigDict(frozen=True)

    def model_post_init(self, context: object, /) -> None:
        # Normalised once, kept in __dict__ beside the fields: matching runs for every
        # candidate trigger of every event, and pydantic private attributes are slow to read.
        items = tuple(
            (label, (value,) if isinstance(value, str) else tuple(value))
            for label, value in self.root.items()
        )
        self.__dict__["_items"] = items
        self.__dict__["_compiled"] = tuple(
            (label, tuple(compile_pattern(c) for c in candidates)) for label, candidates in items
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
        compiled: tuple[tuple[str, tuple[CompiledPattern, ...]], ...] = self.__dict__["_compiled"]
        for label, candidates in compiled:
            if not compiled_matches(candidates, labels.get(label)):
                return False
        return True

    def resource_id_patterns(self) -> tuple[tuple[CompiledPattern, ...], ...] | None:
        """When the specification names no label but the resource id: its patterns, each
        group to be met by the id (`compiled_matches`); else None. The id alone decides
        then, and the events table holds it as a column."""
        compiled: tuple[tuple[str, tuple[CompiledPattern, ...]], ...] = self.__dict__["_compiled"]
        if any(label != RESOURCE_ID for label, _ in compiled):
            return None
        return tuple(candidates for _, candidates in compiled)

    def includes(self, candidates: Iterable[Resource]) -> bool:
        """True if the spec is empty, else if any candidate matches it."""
        if not self.__dict__["_compiled"]:
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
