"""`trigd outbox list|retry` (docs/DELIVERY.md#the-trigd-outbox-command): look at deliveries, put
dead ones back to pending.

`list` opens the database read-only, so it is safe while the daemon runs. `retry` writes
through a short IMMEDIATE transaction beside the running daemon (SQLite serialises the
two writers; the busy timeout covers the daemon's own transactions). The daemon's sender
notices revived rows on its next look at the outbox, within a minute at most.
"""

from __future__ import annotations

import argparse
from typing import Final, TextIO

import apsw

from daemon.core.clock import from_us, to_us, wall_clock
from daemon.core.delivery import DeliveryState, IllegalMove
from daemon.core.exit_codes import ExitCode
from store import outbox
from store.db import SCHEMA_VERSION, DatabaseTooNew, Store, StoreError, user_version

ERROR_WIDTH: Final = 80  # characters of last_error shown per line


def _time(us: int | None) -> str:
    return "-" if us is None else from_us(us).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_row(row: outbox.OutboxRow) -> str:
    """id, status, attempts, automation, endpoint, last error; tab-separated."""
    error = (row.last_error or "-").replace("\n", " ")
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 1] + "…"
    return "\t".join(
        [
            row.id,
            row.status.value,
            str(row.attempts),
            row.automation_id,
            row.endpoint or row.action_type,
            _time(row.created_us),
            error,
        ]
    )


def _list(path: str, status: str | None, limit: int, out: TextIO) -> int:
    store = Store.open_readonly(path)
    try:
        state = DeliveryState(status) if status else None
        rows = outbox.list_rows(store.conn, status=state, limit=limit)
    finally:
        store.close()
    print("id\tstatus\tattempts\tautomation\tendpoint\tcreated\tlast error", file=out)
    for row in rows:
        print(format_row(row), file=out)
    return ExitCode.OK


def _retry(path: str, row_id: str | None, dead: bool, out: TextIO, err: TextIO) -> int:
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
                outbox.revive(conn, row_id, now_us)
            except outbox.UnknownDelivery as exc:
                print(f"trigd outbox retry: {exc.args[0]}", file=err)
                return ExitCode.FAILURE
            except IllegalMove as exc:
                print(
                    f"trigd outbox retry: {row_id} is {exc.state.value}, not dead: only dead "
                    "deliveries are retried (the sender retries the others itself)",
                    file=err,
                )
                return ExitCode.FAILURE
        print(f"{row_id} put back to pending", file=out)
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
            return _list(str(path), getattr(args, "status", None), limit, out)
        if not path.exists():
            raise StoreError(f"{path}: no such database")
        return _retry(str(path), args.id, bool(args.dead), out, err)
    except (StoreError, apsw.Error) as exc:
        print(f"trigd outbox: {exc}", file=err)
        return ExitCode.FAILURE
