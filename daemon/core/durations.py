"""Durations as people write them in trigd.toml and environment variables
(docs/OPERATIONS.md#configuration).

Accepted: a number of seconds (`90`, `0.5`, `"90"`), a compact string of unit components
in descending order (`"500ms"`, `"90s"`, `"15m"`, `"1h30m"`, `"7d"`, `"1.5h"`), or an
ISO-8601 duration (`"PT15M"`, `"P1DT2H"`) parsed by pendulum. Years and months are
refused because they have no fixed length. `format_duration` writes the compact form
back, so `parse_duration(format_duration(d)) == d` for every non-negative `d`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Final

EXAMPLE: Final = "expected a duration such as '90s', '15m' or '1h30m'"

UNITS: Final[Mapping[str, timedelta]] = MappingProxyType(
    {
        "w": timedelta(weeks=1),
        "d": timedelta(days=1),
        "h": timedelta(hours=1),
        "m": timedelta(minutes=1),
        "s": timedelta(seconds=1),
        "ms": timedelta(milliseconds=1),
        "us": timedelta(microseconds=1),
    }
)
"""Compact units, largest first; each may appear once, in this order."""

_COMPONENT: Final = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|us|[wdhms])", re.ASCII)
_NUMBER: Final = re.compile(r"\s*\d+(?:\.\d+)?\s*|\s*\.\d+\s*", re.ASCII)
_UNIT_ORDER: Final = MappingProxyType({unit: rank for rank, unit in enumerate(UNITS)})


def parse_duration(value: str | int | float) -> timedelta:
    """Parse a duration; ValueError says what was wrong and shows the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"{EXAMPLE}, got {value!r}")
    if isinstance(value, int | float):
        return _from_seconds(value, value)
    if not isinstance(value, str):
        raise ValueError(f"{EXAMPLE}, got {type(value).__name__} {value!r}")
    text = value.strip()
    if not text:
        raise ValueError(f"{EXAMPLE}, got an empty string")
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if _NUMBER.fullmatch(text):
        return _from_seconds(float(text), value)
    if text[0] in "Pp":
        return _parse_iso(text.upper(), value)
    return _parse_compact(text, value)


def _from_seconds(seconds: float, original: object) -> timedelta:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{EXAMPLE}, got {original!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {original!r}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration {original!r} is too long") from None


def _parse_compact(text: str, original: str) -> timedelta:
    total = timedelta(0)
    position = 0
    last_rank = -1
    while position < len(text):
        found = _COMPONENT.match(text, position)
        if found is None:
            raise ValueError(f"{EXAMPLE}, got {original!r}")
        number, unit = found.groups()
        rank = _UNIT_ORDER[unit]
        if rank <= last_rank:
            raise ValueError(
                f"{EXAMPLE}, got {original!r} (units must go from largest to smallest, "
                "each at most once)"
            )
        last_rank = rank
        try:
            total += float(number) * UNITS[unit]
        except OverflowError:
            raise ValueError(f"duration {original!r} is too long") from None
        position = found.end()
    return total


def _parse_iso(text: str, original: str) -> timedelta:
    # imported here: most configurations have no ISO duration, and pendulum costs memory
    import pendulum
    from pendulum.parsing.exceptions import ParserError

    problem = f"{EXAMPLE} or ISO-8601 'PT15M', got {original!r}"
    if not any(character.isdigit() for character in text):
        raise ValueError(problem)  # pendulum reads a bare "PT" as zero
    try:
        parsed = pendulum.parse(text, exact=True)
    except (ParserError, ValueError, OverflowError):
        raise ValueError(problem) from None
    if not isinstance(parsed, pendulum.Duration):
        raise ValueError(problem)
    if parsed.years or parsed.months:
        raise ValueError(
            f"years and months have no fixed length; write days instead, got {original!r}"
        )
    # A pendulum Duration is a timedelta; keep the exact microseconds, drop the subclass.
    return timedelta(parsed.days, parsed.seconds, parsed.microseconds)


def format_duration(value: timedelta) -> str:
    """The compact form for messages: `timedelta(seconds=5400)` → `"1h30m"`."""
    if value < timedelta(0):
        return "-" + format_duration(-value)
    if value == timedelta(0):
        return "0s"
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{value.days}d"] if value.days else []
    parts += [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes else []
    micro = value.microseconds
    if micro == 0:
        parts += [f"{seconds}s"] if seconds else []
    elif seconds == 0 and micro % 1000 == 0:
        parts.append(f"{micro // 1000}ms")
    elif seconds == 0 and micro < 1000:
        parts.append(f"{micro}us")
    else:
        parts.append(f"{seconds}.{micro:06d}".rstrip("0") + "s")
    return "".join(parts)
