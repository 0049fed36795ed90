"""A stand-in for Prefect's `/events/in` that validates late, run by uvicorn from Prefect's
virtualenv (tests/support/prefect_venv.py) as Prefect's server is: uvicorn answers a
checkpoint's ping as soon as it reads it, while the app takes the events one by one after.

The first time the app meets the refused event (resource label `refuse`) it stalls
`LATE_UPSTREAM_STALL` seconds, a busy server, before failing on it, which closes the
connection (1011) as Prefect's server does on an event it cannot validate. The ids it takes
are appended to the file `LATE_UPSTREAM_TAKEN`; until the file `LATE_UPSTREAM_OPEN` exists,
every connection is turned away. Run: `python -m uvicorn --app-dir tests/support
late_upstream_app:app --fd N`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Message = dict[str, Any]

TAKEN = Path(os.environ["LATE_UPSTREAM_TAKEN"])
OPEN = Path(os.environ["LATE_UPSTREAM_OPEN"])
STALL = float(os.environ["LATE_UPSTREAM_STALL"])
stalled = False


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    global stalled
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    if not OPEN.exists():  # noqa: ASYNC240 (a test stand-in: a stat, not worth a thread)
        await send({"type": "websocket.close", "code": 1013})
        return
    await send({"type": "websocket.accept", "subprotocol": "prefect"})
    await receive()  # the auth message
    await send({"type": "websocket.send", "text": json.dumps({"type": "auth_success"})})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        event = json.loads(message["text"])
        if "refuse" in event["resource"]:
            if not stalled:
                stalled = True
                await asyncio.sleep(STALL)
            raise ValueError("an event this server refuses")
        with TAKEN.open("a") as taken:  # noqa: ASYNC230
            taken.write(event["id"] + "\n")
