"""`trigd outbox list|retry|cancel|send-now` (docs/DELIVERY.md#the-trigd-outbox-command): look
at deliveries, put dead ones back to pending, cancel one, or send one now.

`list` opens the database read-only, so it is safe while the daemon runs. The others write
through a short IMMEDIATE transaction beside the running daemon (SQLite serialises the
two writers; the busy timeout covers the daemon's own transactions). The daemon's sender
notices a revived or hurried row on its next look at the outbox, within a minute at most.

Ids may be given by a unique prefix. What `list` shows of a webhook's URL is what the
automation says (secret references unresolved) without user info, and with the value of
every query parameter masked: a token in the query stays out of the terminal, the path
still tells endpoints apart.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, TextIO
from urllib.parse import parse_qsl, urlsplit

import apsw

from daemon.core.action_models import REDACTED
from daemon.core.clock import from_us, to_us, wall_clock
from daemon.core.delivery import DeliveryState, IllegalMove
from daemon.core.exit_codes import ExitCode
from store import outbox
from store.db import SCHEMA_VERSION, DatabaseTooNew, Store, StoreError, user_version

ERROR_WIDTH: Final = 80  # characters of last_error shown per line
HEADER: Final = "id\tstatus\tattempts\tnext attempt\tautomation\turl\tlast error"


def _time(us: int | None) -> str | None:
    return None if us is None else from_us(us).strftime("%Y-%m-%dT%H:%M:%SZ")


def shown_url(url: str) -> str:
    """scheme://host[:port]/path of `url`, no user info, no fragment, each query value
    masked (`?token=********`); `url` itself when it does not parse."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return REDACTED
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    shown = f"{parts.scheme}://{host}" + ("" if port is None else f":{port}") + parts.path
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        shown += "?" + "&".join(f"{key}={REDACTED}" for key, _ in pairs) if pairs else "?"
    return shown


def _document(row: outbox.OutboxRow) -> dict[str, Any]:
    try:
        document = json.loads(row.document)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def describe_row(row: outbox.OutboxRow) -> dict[str, Any]:
    """What `list --json` prints of one row (and the columns of `list`)."""
    document = _document(row)
    automation = document.get("automation")
    action = document.get("action")
    name = automation.get("name") if isinstance(automation, dict) else None
    url = action.get("url") if isinstance(action, dict) else None
    return {
        "id": row.id,
        "status": row.status.value,
        "attempts": row.attempts,
        "next_attempt": _time(row.next_attempt_us) if row.status is DeliveryState.PENDING else None,
        "automation_id": row.automation_id,
        "automation": name if isinstance(name, str) else None,
        "action_type": row.action_type,
        "url": shown_url(url) if isinstance(url, str) else None,
        "created": _time(row.created_us),
        "finished": _time(row.finished_us),
        "last_error": row.last_error,
    }


def format_row(row: outbox.OutboxRow) -> str:
    """id, status, attempts, next attempt, automation, url, last error; tab-separated."""
    shown = describe_row(row)
    error = (row.last_error or "-").replace("\n", " ")
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 1] + "…"
    return "\t".join(
        [
            row.id,
            row.status.value,
            str(row.attempts),
            shown["next_attempt"] or "-",
            shown["automation"] or row.automation_id,
            shown["url"] or row.endpoint or row.action_type,
            error,
        ]
    )


def _list(path: str, args: argparse.Namespace, out: TextIO) -> int:
    status: str | None = getattr(args, "status", None)
    store = Store.open_readonly(path)
    try:
        state = DeliveryState(status) if status else None
        rows = outbox.list_rows(store.conn, status=state, limit=getattr(args, "limit", 50))
    finally:
        store.close()
    if getattr(args, "json", False):
        print(json.dumps([describe_row(row) for row in rows], indent=2), file=out)
        return ExitCode.OK
    print(HEADER, file=out)
    for row in rows:
        print(format_row(row), file=out)
    return ExitCode.OK


Change = Callable[[apsw.Connection, str, int], None]

_CHANGES: Final[Mapping[str, tuple[Change, str, str]]] = MappingProxyType(
    {
        # action: (store function, done message, why a row in another state is refused)
        "retry": (
            outbox.revive,
            "put back to pending",
            "only dead deliveries are retried (the sender retries the others itself)",
        ),
        "cancel": (
            outbox.cancel,
            "cancelled: it will not be sent",
            "only pending and dead deliveries are cancelled; one in flight may be reaching the "
            "endpoint now: cancel it once its attempt ends, if it is pending again",
        ),
        "send-now": (
            outbox.send_now,
            "due now: the running daemon sends it within a minute",
            "only pending deliveries are sent now (retry a dead one)",
        ),
    }
)


def _change(
    path: str, action: str, row_id: str | None, dead: bool, out: TextIO, err: TextIO
) -> int:
    change, done, refused = _CHANGES[action]
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        conn.set_busy_timeout(10_000)
        if user_version(conn) > SCHEMA_VERSION:
            raise DatabaseTooNew(f"{path}: database schema is newer than this trigd understands")
        conn.transaction_mode = "IMMEDIATE"
        now_us = to_us(wall_clock())
        with conn:
            if dead:
                count = outbox.revive_all_dead(conn, now_us)
                print(f"{count} dead deliveries put back to pending", file=out)
                return ExitCode.OK
            assert row_id is not None
            try:
                full_id = outbox.resolve_id(conn, row_id)
                change(conn, full_id, now_us)
            except (outbox.UnknownDelivery, outbox.AmbiguousDelivery) as exc:
                print(f"trigd outbox {action}: {exc.args[0]}", file=err)
                return ExitCode.FAILURE
            except IllegalMove as exc:
                print(f"trigd outbox {action}: {full_id} is {exc.state.value}: {refused}", file=err)
                return ExitCode.FAILURE
        print(f"{full_id} {done}", file=out)
        return ExitCode.OK
    finally:
        conn.close()


def outbox_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from daemon.cli.status import database_path
    from daemon.core.config import ConfigError

    limit = getattr(args, "limit", 50)
    if args.outbox_command == "list" and limit < 1:
        print("trigd outbox list: --limit must be at least 1", file=err)
        return ExitCode.USAGE
    try:
        path = database_path(args)
    except ConfigError as exc:
        print(f"trigd outbox: {exc}", file=err)
        return ExitCode.USAGE
    try:
        if args.outbox_command == "list":
            return _list(str(path), args, out)
        if not path.exists():
            raise StoreError(f"{path}: no such database")
        dead = bool(getattr(args, "dead", False))
        return _change(str(path), args.outbox_command, args.id, dead, out, err)
    except (StoreError, apsw.Error) as exc:
        print(f"trigd outbox: {exc}", file=err)
        return ExitCode.FAILURE
