"""The `automations` and `triggers` tables: what was loaded last, and how each trigger
looked (its fingerprint), so the engine can tell unchanged triggers, whose buckets are
kept across reloads and restarts, from changed or vanished ones, which start fresh.

Functions of a connection, called inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import apsw


class AutomationRow(NamedTuple):
    id: str
    name: str
    enabled: bool
    definition: str  # Automation JSON, redacted: no secret or header value at rest
    loaded_us: int


class TriggerRow(NamedTuple):
    id: str
    automation_id: str
    fingerprint: str


def stored_triggers(conn: apsw.Connection) -> dict[str, TriggerRow]:
    """Every trigger recorded by the last load, by id."""
    return {
        str(tid): TriggerRow(str(tid), str(aid), str(fp))
        for tid, aid, fp in conn.execute("SELECT id, automation_id, fingerprint FROM triggers")
    }


def replace_loaded(
    conn: apsw.Connection, automations: Iterable[AutomationRow], triggers: Iterable[TriggerRow]
) -> None:
    """Make the tables describe exactly this set."""
    conn.execute("DELETE FROM automations")
    conn.execute("DELETE FROM triggers")
    conn.executemany(
        "INSERT INTO automations (id, name, enabled, definition, loaded_us) VALUES (?, ?, ?, ?, ?)",
        ((a.id, a.name, int(a.enabled), a.definition, a.loaded_us) for a in automations),
    )
    conn.executemany(
        "INSERT INTO triggers (id, automation_id, fingerprint) VALUES (?, ?, ?)", triggers
    )


def loaded_automations(conn: apsw.Connection) -> list[AutomationRow]:
    return [
        AutomationRow(str(i), str(n), bool(e), str(d), int(t))
        for i, n, e, d, t in conn.execute(
            "SELECT id, name, enabled, definition, loaded_us FROM automations ORDER BY name"
        )
    ]
