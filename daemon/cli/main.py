"""The ``trigd`` command line (docs/OPERATIONS.md#commands).

Exit codes: 0 success, 1 the work asked failed, 2 bad usage or bad configuration (the message
names the key or flag and why). Subcommands import what they need lazily so that
``trigd check`` on a small edge box does not pay for trio and httpx.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Final
from urllib.parse import urlsplit

from daemon import __version__
from daemon.core.delivery import DeliveryState
from daemon.core.durations import parse_duration

DEFAULT_URL: Final = "ws://127.0.0.1:4280/api/events/in"
TAIL_URL: Final = "ws://127.0.0.1:4280/api/events/out"


def websocket_url(text: str) -> str:
    """``--url``: a ws:// or wss:// URL with a host and a valid port."""
    try:
        url = urlsplit(text)
        _ = url.port  # ValueError when it is not a number in 0..65535
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid URL: {exc}") from None
    if url.scheme not in ("ws", "wss"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a websocket URL: the scheme must be ws:// or wss://, "
            f"such as {DEFAULT_URL}"
        )
    if not url.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} has no host, such as {DEFAULT_URL}")
    return text


def duration(text: str) -> timedelta:
    """``--since``: a duration as the configuration writes them (``10m``, ``1h30m``, ``90``)."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < timedelta(0):
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """``--timeout``: a number of seconds above zero."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return seconds


def _outbox_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """--db and --config of `trigd outbox`, accepted before the action and after it. At the
    action's level they default to SUPPRESS, so that one given before is not reset."""
    parser.add_argument(
        "--db", metavar="PATH", default=default, help="database file (default: as trigd serve)"
    )
    parser.add_argument("--config", metavar="FILE", default=default, help="TOML configuration file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trigd", description="Edge automation engine for Prefect-style events."
    )
    parser.add_argument("--version", action="version", version=f"trigd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address for the websocket server")
    serve.add_argument("--db", metavar="PATH", help="SQLite database file")
    serve.add_argument(
        "--automations", metavar="PATH", nargs="+", help="automation files or globs (YAML/JSON)"
    )
    serve.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="overrides [log] level (default INFO)",
    )

    check = sub.add_parser("check", help="validate automation files and configuration files")
    check.add_argument("paths", metavar="PATH", nargs="+")
    check.add_argument(
        "--event",
        metavar="FILE",
        help="one event as JSON to trial-render templates with (default: a built-in sample)",
    )
    check.add_argument("--strict", action="store_true", help="make warnings errors (exit 1)")

    emit = sub.add_parser("emit", help="send events to a running daemon and wait for acks")
    emit.add_argument(
        "--url",
        type=websocket_url,
        default=DEFAULT_URL,
        help=f"websocket URL (default {DEFAULT_URL})",
    )
    emit.add_argument(
        "--token",
        default=None,
        help="auth token (default: $TRIGD_SERVER_AUTH_TOKEN, as serve reads it, else $TRIGD_TOKEN)",
    )
    emit.add_argument(
        "--timeout", type=positive_seconds, default=30.0, help="seconds to wait for acks"
    )
    emit.add_argument(
        "file", metavar="FILE", nargs="?", help="JSON lines or a JSON array; - or absent: stdin"
    )

    tail = sub.add_parser("tail", help="print the events a running daemon commits, as they come")
    tail.add_argument(
        "--url",
        type=websocket_url,
        default=TAIL_URL,
        help=f"events-out websocket URL, or the daemon's ws://HOST:PORT (default {TAIL_URL})",
    )
    tail.add_argument("--token", default=None, help="auth token (default: as emit)")
    tail.add_argument("--event", metavar="PREFIX", help="only events whose name starts so")
    tail.add_argument("--resource", metavar="ID", help="only events of this resource id")
    tail.add_argument(
        "--since",
        type=duration,
        default=timedelta(minutes=10),
        help="first the stored events this recent (default 10m; the daemon's [events_out] "
        "backfill bounds it; 0: none)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per event")

    status = sub.add_parser("status", help="summarise the database (read-only)")
    status.add_argument("--db", metavar="PATH", help="database file (default: as trigd serve)")
    status.add_argument("--config", metavar="FILE", help="TOML configuration file")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")

    explain = sub.add_parser("explain", help="why an automation did or did not fire (read-only)")
    explain.add_argument("automation", metavar="NAME|ID", help="a loaded automation")
    explain.add_argument("--key", metavar="KEY", help="one bucketing key: a value, or a JSON array")
    explain.add_argument("--db", metavar="PATH", help="database file (default: as trigd serve)")
    explain.add_argument("--config", metavar="FILE", help="TOML configuration file")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")

    backtest = sub.add_parser(
        "backtest", help="replay stored events through automations from a file (read-only)"
    )
    backtest.add_argument("file", metavar="FILE", nargs="+", help="automation files or globs")
    backtest.add_argument(
        "--since", metavar="DURATION", default="24h", help="replay events this recent (24h)"
    )
    backtest.add_argument("--db", metavar="PATH", help="database file (default: as trigd serve)")
    backtest.add_argument("--config", metavar="FILE", help="TOML configuration file")
    backtest.add_argument("--json", action="store_true", help="print the firings as JSON")

    outbox = sub.add_parser("outbox", help="inspect, retry, cancel or hurry webhook deliveries")
    _outbox_options(outbox)
    osub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    olist = osub.add_parser("list", help="list deliveries, newest first")
    _outbox_options(olist, default=argparse.SUPPRESS)
    olist.add_argument("--status", choices=[state.value for state in DeliveryState])
    olist.add_argument("--limit", type=int, default=50)
    olist.add_argument("--json", action="store_true", help="print the rows as JSON")
    oretry = osub.add_parser("retry", help="put dead deliveries back to pending")
    _outbox_options(oretry, default=argparse.SUPPRESS)
    target = oretry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", metavar="ID", help="a delivery id or a unique prefix")
    target.add_argument("--dead", action="store_true", help="every dead delivery")
    ocancel = osub.add_parser("cancel", help="never send a pending or dead delivery")
    _outbox_options(ocancel, default=argparse.SUPPRESS)
    ocancel.add_argument("id", metavar="ID", help="a delivery id or a unique prefix")
    onow = osub.add_parser("send-now", help="make a pending delivery due now")
    _outbox_options(onow, default=argparse.SUPPRESS)
    onow.add_argument("id", metavar="ID", help="a delivery id or a unique prefix")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: str = args.command
    if command == "serve":
        from daemon.runtime.service import serve_command

        return serve_command(args)
    if command == "check":
        from daemon.cli.check import check_command

        return check_command(
            args.paths, sys.stdout, sys.stderr, event=args.event, strict=args.strict
        )
    if command == "emit":
        from daemon.cli.emit import emit_command

        return emit_command(args, sys.stdin, sys.stdout, sys.stderr)
    if command == "tail":
        from daemon.cli.tail import tail_command

        return tail_command(args, sys.stdout, sys.stderr)
    if command == "status":
        from daemon.cli.status import status_command

        return status_command(args, sys.stdout, sys.stderr)
    if command == "explain":
        from daemon.cli.explain import explain_command

        return explain_command(args, sys.stdout, sys.stderr)
    if command == "backtest":
        from daemon.cli.backtest import backtest_command

        return backtest_command(args, sys.stdout, sys.stderr)
    if command == "outbox":
        from daemon.cli.outbox_cli import outbox_command

        return outbox_command(args, sys.stdout, sys.stderr)
    raise AssertionError(f"unhandled command {command!r}")  # argparse rejects the rest
