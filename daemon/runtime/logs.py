"""The daemon's log lines (docs/OPERATIONS.md#logs): `[log] level` and `[log] format`.

`text` is one line per record, `LEVEL logger: message`, with the time in front unless
journald (which stamps lines itself) reads stderr. `json` is one JSON object per line:
`time` (UTC, ISO 8601), `level`, `logger`, `message`, then the structured fields the
daemon passes with `extra=` (`automation`, `trigger`, `bucket`, `delivery`, `endpoint`,
`status_code`, `next_attempt`, ...) as keys of their own, and `exception` with a
traceback. Those fields hold names, ids and `scheme://host:port`, never a URL's path or
query, a header value, a secret or a token.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Final

from daemon.core.config import LogFormat, LogLevel

_STANDARD: Final = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
"""Attributes every record has; anything else on a record came with `extra=`."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=_jsonable, ensure_ascii=False)


def configure_logging(level: LogLevel | str, format: LogFormat = "text") -> None:
    """Send every record at `level` or above to stderr in `format` (replaces any earlier
    setup: start-up configures once from the flag, again once the config is read)."""
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        under_journald = "JOURNAL_STREAM" in os.environ
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if under_journald else TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # one line per webhook request is noise at INFO; the sender logs what matters
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
