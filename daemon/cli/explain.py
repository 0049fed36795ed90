"""``trigd explain NAME|ID``: why an automation did or did not fire (docs/INSIGHT.md).

Read-only and safe while the daemon serves: the database is opened read-only, as
``trigd status`` opens it, and the writer's lock is never taken. ``--json`` prints the
document `daemon/engine/explain.py` builds; without it, the same as text.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

import apsw

from daemon.core.clock import wall_clock
from daemon.core.exit_codes import ExitCode
from daemon.core.explanation import parse_key
from daemon.engine.explain import Limits, UnknownAutomation, UnreadableAutomation, explain
from store.db import Store, StoreError


def explain_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from daemon.cli.status import command_config
    from daemon.core.config import ConfigError

    try:
        config = command_config(args)
        key = None if args.key is None else parse_key(args.key)
    except (ConfigError, ValueError) as exc:  # the configuration, or --key
        print(f"trigd explain: {exc}", file=err)
        return ExitCode.USAGE
    limits = Limits(config.insight.recent_events, config.insight.listed)
    try:
        store = Store.open_readonly(config.store.path)
    except (StoreError, apsw.Error) as exc:
        print(f"trigd explain: {exc}", file=err)
        return ExitCode.FAILURE
    try:
        with store.conn:  # one snapshot: a serving daemon's commits land before or after
            document = explain(store.conn, args.automation, wall_clock(), key=key, limits=limits)
    except UnreadableAutomation as exc:
        print(f"trigd explain: {exc}", file=err)
        return ExitCode.FAILURE
    except UnknownAutomation as exc:
        print(f"trigd explain: {exc} (trigd status lists them)", file=err)
        return ExitCode.FAILURE
    finally:
        store.close()
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False), file=out)
    else:
        print(render(document), file=out)
    return ExitCode.OK


def render(document: dict[str, Any]) -> str:
    """The document as text for a person."""
    automation = document["automation"]
    lines = [
        f"automation {automation['name']} ({automation['id']})"
        + ("" if automation["enabled"] else " (disabled)"),
        f"event time now: {document['as_of']} (events clock {document['events_clock'] or '-'})",
    ]
    if document["key"] is not None:
        lines.append(f"key: {json.dumps(document['key'], ensure_ascii=False)}")
    lines += _trigger(document["trigger"], "")
    firings = document["firings"]
    lines.append(f"last firings: {'none stored' if not firings else ''}".rstrip())
    for firing in firings:
        event = firing["triggering_event"]
        labels = json.dumps(firing["labels"], ensure_ascii=False) if firing["labels"] else "(all)"
        by = (
            "no event"
            if event is None
            else f"{event['event']} {event['id']} at {event['occurred']}"
        )
        lines.append(f"  {firing['fired']} key {labels} by {by}")
    lines.append(f"({document['events_scanned']} most recent events scanned)")
    return "\n".join(lines)


def _trigger(node: dict[str, Any], indent: str) -> list[str]:
    can = "can fire" if node["can_fire"] else "cannot fire now"
    kind = node["type"] + (f", {node['posture']}" if "posture" in node else "")
    lines = [
        f"{indent}{node['path']} ({kind}): {node['settings']}",
        f"{indent}  {can}",
    ]
    lines += [f"{indent}  - {why}" for why in node["why"]]
    if node["type"] != "event":
        for fired in node["fired_children"]:
            event = fired["triggering_event"] or {}
            lines.append(
                f"{indent}  fired child {fired['path']} at {fired['at']}"
                f" (by {event.get('event')} {event.get('id')})"
            )
        for child in node["children"]:
            lines += _trigger(child, indent + "  ")
        return lines
    lines.append(f"{indent}  open buckets: {node['open_buckets']}")
    for bucket in node["buckets"]:
        last = bucket["last_event"]
        after = "" if bucket["after_seen"] is None else ", after seen"
        lines.append(
            f"{indent}    key {json.dumps(bucket['key'], ensure_ascii=False)}: "
            f"{bucket['start']} .. {bucket['end']}, {bucket['count']} of {bucket['threshold']}"
            f"{after}, {bucket['state']}"
            + ("" if last is None else f", last {last['event']} {last['id']}")
        )
    for title, field in (("matched", "matched"), ("near misses", "near_misses")):
        entries = node[field]
        lines.append(f"{indent}  {title}: {len(entries) or 'none'}")
        lines += [
            f"{indent}    {e['occurred']} {e['event']} {e['id']} ({e['resource']}): {e['why']}"
            for e in entries
        ]
    if node["parked"]:
        lines.append(f"{indent}  parked, waiting for the event they follow:")
        lines += [
            f"{indent}    {e['occurred']} {e['event']} {e['id']} waits for {e['waits_for']}"
            for e in node["parked"]
        ]
    return lines
