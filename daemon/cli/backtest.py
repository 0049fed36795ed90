"""``trigd backtest FILE [--since 24h]``: the firings automations from a file would have made
on the stored events, beside those the loaded ones really made (docs/INSIGHT.md#backtest).

The live database is opened read-only (safe while the daemon serves); the replay runs on
a scratch store in a temporary directory, removed afterwards, with `synchronous = off`
and its rollback journal in memory (it is thrown away: nothing there needs to survive a
crash), collecting garbage less often (`replay_gc`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TextIO

import apsw

from daemon.core.automations import Automation, AutomationFileError, load_automation_files
from daemon.core.clock import wall_clock
from daemon.core.durations import parse_duration
from daemon.core.events import UnreadableEvent
from daemon.core.exit_codes import ExitCode
from daemon.core.explanation import iso
from daemon.engine.backtest import Firing, diff, live_firings, loaded_ids, replay
from daemon.engine.engine import Engine
from store.db import Store, StoreError

SCRATCH_NAME = "backtest.db"

REPLAY_YOUNG_COLLECTIONS: Final = 50_000
"""Net new container objects between young collections during a replay (CPython's
default is 700): each event of a replay makes a few dozen short-lived objects that
refcounting frees, so collections walking them every few dozen events were about a
sixth of the replay's CPU."""


def open_scratch(path: Path) -> Store:
    """The replay's store: thrown away afterwards, so nothing in it needs to survive a
    crash: no fsync (`synchronous = off`), and the rollback journal in memory instead of
    the WAL (each page is written once, not to the WAL and again by its checkpoint; a
    transaction still rolls back)."""
    scratch = Store.open(path, synchronous="normal")
    try:
        scratch.conn.execute("PRAGMA synchronous = OFF")
        scratch.conn.execute("PRAGMA journal_mode = MEMORY")
    except BaseException:
        scratch.close()
        raise
    return scratch


@contextlib.contextmanager
def replay_gc() -> Iterator[None]:
    """Collect less often while replaying, and never walk what start-up built (modules,
    schemas, the automations: `gc.freeze`); as before afterwards."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(REPLAY_YOUNG_COLLECTIONS, thresholds[1], thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def backtest_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from daemon.cli.status import command_config
    from daemon.core.config import ConfigError

    try:
        config = command_config(args)
        span = parse_duration(args.since)
    except ConfigError as exc:
        print(f"trigd backtest: {exc}", file=err)
        return ExitCode.USAGE
    except ValueError as exc:
        print(f"trigd backtest: --since: {exc}", file=err)
        return ExitCode.USAGE
    try:
        automations = load_automation_files(args.file)
    except AutomationFileError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return ExitCode.USAGE
    until = wall_clock()
    since = until - span
    engine = Engine.configured(config)
    try:
        live = Store.open_readonly(config.store.path)
    except (StoreError, apsw.Error) as exc:
        print(f"trigd backtest: {exc}", file=err)
        return ExitCode.FAILURE
    try:
        with tempfile.TemporaryDirectory(prefix="trigd-backtest-") as scratch_dir:
            scratch = open_scratch(Path(scratch_dir) / SCRATCH_NAME)
            try:
                with live.conn, replay_gc():  # one read snapshot of the live database
                    result = replay(
                        live.conn,
                        scratch.conn,
                        engine,
                        automations,
                        since,
                        until,
                        batch=config.insight.backtest_batch,
                        bucket_cache=config.insight.backtest_bucket_cache,
                        seen_cache=config.insight.backtest_seen_cache,
                        granularity=config.triggers.proactive_granularity,
                    )
                    loaded = loaded_ids(live.conn, automations)
                    really = live_firings(live.conn, loaded, since, until)
            finally:
                scratch.close()
    except UnreadableEvent as exc:  # stored by another trigd: the replay cannot go on
        print(f"trigd backtest: {exc}", file=err)
        return ExitCode.FAILURE
    finally:
        live.close()
    document = report(automations, result.firings, really, loaded, since, until)
    document["replayed"] = result.replayed
    document["skipped"] = result.skipped
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False), file=out)
    else:
        print(render(document), file=out)
    return ExitCode.OK


def report(
    automations: list[Automation],
    firings: list[Firing],
    really: list[Firing],
    loaded: list[str],
    since: datetime,
    until: datetime,
) -> dict[str, Any]:
    """The backtest as a document: per automation of the file, its firings, each marked
    "same", "backtest only" or "live only" when the automation is loaded live."""
    names = {str(a.id): a.name for a in automations}
    entries = []
    for automation in automations:
        aid = str(automation.id)
        mine = [f for f in firings if f.automation_id == aid]
        if aid in loaded:
            rows = diff(mine, [f for f in really if f.automation_id == aid]).rows
            listed = [{**f.document(names), "diff": kind} for kind, f in rows]
        else:
            listed = [f.document(names) for f in mine]
        entries.append(
            {"id": aid, "name": automation.name, "loaded": aid in loaded, "firings": listed}
        )
    return {"since": iso(since), "until": iso(until), "automations": entries}


_MARK: Final = MappingProxyType({"same": "=", "backtest only": "+", "live only": "-"})


def render(document: dict[str, Any]) -> str:
    lines = [
        f"replayed {document['replayed']} events that occurred from {document['since']} "
        f"to {document['until']} ({document['skipped']} no trigger sees were skipped)"
    ]
    for entry in document["automations"]:
        firings = entry["firings"]
        head = f"{entry['name']} ({entry['id']}): {len(firings)} firing(s)"
        if entry["loaded"]:
            kinds = [f["diff"] for f in firings]
            would = len(firings) - kinds.count("live only")
            fired = len(firings) - kinds.count("backtest only")
            head = (
                f"{entry['name']} ({entry['id']}): would fire {would}, fired live {fired} "
                "(= same, + backtest only, - live only)"
            )
        lines.append(head)
        for f in firings:
            mark = _MARK.get(f.get("diff", ""), " ")
            labels = json.dumps(f["labels"], ensure_ascii=False) if f["labels"] else "(all)"
            by = f["triggering_event"]
            by_text = "no event" if by is None else f"{f['triggering_event_name']} {by}"
            lines.append(f"  {mark} {f['fired']}  key {labels}  by {by_text}")
    return "\n".join(lines)
