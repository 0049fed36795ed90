"""A parsed event on its way to the store, and the connection waiting for its reply.

Ingest (``daemon.runtime``) makes one ``Submission`` per event and sends it to the
evaluator; the evaluator resolves it once its batch is settled; ``handshake`` encodes the
reply. The type lives in the wire layer, below both, because the reply is part of the
protocol.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from daemon.core.events import ReceivedEvent


class ReplySink(Protocol):
    """Where a submission's outcome goes once its batch is settled (its connection)."""

    def resolved(self, submission: Submission, error: str | None) -> None:
        """Must not block: called by the evaluator for every event of every batch."""


@attrs.define(slots=True, eq=False)
class Submission:
    """One parsed event on its way to the store, and the connection waiting to hear of it.

    Accepted, duplicate and parked events are all simply "committed" to the client; only
    an internal error refuses one here (bad input never reaches the evaluator). ``done``
    and ``error`` are written by ``ReplySink.resolved`` implementations.
    """

    event: ReceivedEvent
    sink: ReplySink
    done: bool = False
    error: str | None = None
