"""The outbox: one row per triggered action, committed with the firing that made it.

Functions of a connection, called inside the caller's transaction. The delivery side
(claiming, leases, attempts) is added by the sender.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import apsw


class NewOutboxRow(NamedTuple):
    id: str  # TriggeredAction.id; also the webhook-id of every attempt
    automation_id: str
    action_index: int
    action_type: str
    endpoint: str | None  # scheme://host:port for webhooks, None for do-nothing
    document: str  # TriggeredAction JSON
    created_us: int


def enqueue(conn: apsw.Connection, rows: Iterable[NewOutboxRow]) -> None:
    """Add pending rows, due at once."""
    conn.executemany(
        "INSERT INTO outbox (id, automation_id, action_index, action_type, endpoint, status, "
        "document, created_us, next_attempt_us) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        (
            (
                r.id,
                r.automation_id,
                r.action_index,
                r.action_type,
                r.endpoint,
                r.document,
                r.created_us,
                r.created_us,
            )
            for r in rows
        ),
    )
