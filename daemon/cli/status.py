"""``trigd status``: a read-only summary of the database, safe while the daemon runs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import apsw

from daemon.core.clock import from_us, to_us
from daemon.core.counters import META_KEY as COUNTERS_KEY
from daemon.core.counters import describe as describe_counters
from daemon.core.exit_codes import ExitCode
from daemon.core.upstream import describe as describe_upstream
from store.automations import loaded_automations
from store.db import Store, StoreError
from store.events import inbox_size, read_meta
from store.ordering import parked_count
from store.upstream import FORWARD_CURSOR_KEY, backlog, forward_cursor, subscribe_position

if TYPE_CHECKING:
    from daemon.core.config import Config


def _scalar(conn: apsw.Connection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def _time(us: int | None) -> str | None:
    if us is None:
        return None
    return from_us(us).isoformat().replace("+00:00", "Z")


def summarise(conn: apsw.Connection) -> dict[str, Any]:
    outbox = {"pending": 0, "in_flight": 0, "delivered": 0, "dead": 0, "cancelled": 0}
    for status, count in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"):
        outbox[str(status)] = int(count)
    automations = [
        {"id": row.id, "name": row.name, "enabled": row.enabled} for row in loaded_automations(conn)
    ]
    last = conn.execute("SELECT max(received_us), max(occurred_us) FROM events").fetchone()
    counters = read_meta(conn, COUNTERS_KEY)
    return {
        "automations": automations,
        "open_buckets": _scalar(conn, "SELECT count(*) FROM buckets"),
        "parked_followers": parked_count(conn),
        "inbox": inbox_size(conn),
        "events_stored": _scalar(conn, "SELECT count(*) FROM events"),
        "last_event_received": _time(last[0] if last else None),
        "last_event_occurred": _time(last[1] if last else None),
        "outbox": outbox,
        "daemon": None if counters is None else json.loads(counters),
        "upstream": _upstream(conn),
    }


def _upstream(conn: apsw.Connection) -> dict[str, Any] | None:
    """What the database says of `[upstream]`, true even while the daemon is down: the
    events not yet forwarded (once forwarding ever ran) and the subscribe position."""
    position = subscribe_position(conn)
    if read_meta(conn, FORWARD_CURSOR_KEY) is None and position is None:
        return None
    waiting = backlog(conn, forward_cursor(conn))
    return {
        "unforwarded": waiting.count,
        "oldest_unforwarded_received": _time(waiting.oldest_received_us),
        "subscribe_position": None if position is None else _time(to_us(position)),
    }


def render(summary: dict[str, Any]) -> str:
    enabled = [a for a in summary["automations"] if a["enabled"]]
    lines = [f"automations: {len(enabled)} loaded"]
    lines += [f"  {a['name']} ({a['id']})" for a in enabled]
    outbox = summary["outbox"]
    lines += [
        f"open buckets: {summary['open_buckets']}",
        f"parked followers: {summary['parked_followers']}",
        f"events stored: {summary['events_stored']} (inbox {summary['inbox']})",
        f"last event: received {summary['last_event_received'] or '-'}, "
        f"occurred {summary['last_event_occurred'] or '-'}",
        f"outbox: {outbox['pending']} pending, {outbox['in_flight']} in flight, "
        f"{outbox['delivered']} delivered, {outbox['dead']} dead, "
        f"{outbox['cancelled']} cancelled",
    ]
    upstream = summary.get("upstream")
    if upstream:
        lines.append(
            f"upstream: {upstream['unforwarded']} events not forwarded yet (oldest received "
            f"{upstream['oldest_unforwarded_received'] or '-'}), subscribed up to "
            f"{upstream['subscribe_position'] or '-'}"
        )
    daemon = summary["daemon"]
    lines += describe_counters(daemon) if daemon else ["daemon: no counters stored yet"]
    if daemon and isinstance(daemon.get("upstream"), dict):
        lines += describe_upstream(daemon["upstream"])
    return "\n".join(lines)


def command_config(args: argparse.Namespace) -> Config:
    """The configuration a command that reads the database resolves as `trigd serve`
    does: `--config` (else none), the environment, and `--db` over the store path."""
    from daemon.core.config import load_config

    return load_config(
        Path(args.config) if getattr(args, "config", None) else None,
        os.environ,
        {"db": args.db} if getattr(args, "db", None) else {},
    )


def database_path(args: argparse.Namespace) -> Path:
    """--db, else the configured store path (config file and environment), else the default."""
    return Path(command_config(args).store.path)


def status_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from daemon.core.config import ConfigError

    try:
        path = database_path(args)
        store = Store.open_readonly(path)
    except ConfigError as exc:
        print(f"trigd status: {exc}", file=err)
        return ExitCode.USAGE
    except (StoreError, apsw.Error) as exc:
        print(f"trigd status: {exc}", file=err)
        return ExitCode.FAILURE
    try:
        summary = summarise(store.conn)
    finally:
        store.close()
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(f"database: {path}", file=out)
        print(render(summary), file=out)
    return ExitCode.OK
