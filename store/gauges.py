"""What ``/metrics`` reads from the store at scrape time: counts that live in tables.

Parked followers, open buckets and outbox rows per status are rows, not counters kept in
memory, so a scrape reads them here (one short read through the gateway) and the hot path
keeps nothing for them.
"""

from __future__ import annotations

import apsw
import attrs


@attrs.frozen
class StoreGauges:
    parked_followers: int
    open_buckets: int
    outbox: dict[str, int]  # rows per status: pending, delivered, dead, cancelled


def read_gauges(conn: apsw.Connection) -> StoreGauges:
    """The counts (three reads; no write lock taken)."""
    parked = conn.execute("SELECT count(*) FROM ordering_followers").fetchone()
    buckets = conn.execute("SELECT count(*) FROM buckets").fetchone()
    outbox = {
        str(status): int(count)
        for status, count in conn.execute("SELECT status, count(*) FROM outbox GROUP BY status")
    }
    return StoreGauges(int(parked[0]) if parked else 0, int(buckets[0]) if buckets else 0, outbox)
