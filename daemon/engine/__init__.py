"""The engines: deterministic transaction scripts over one apsw connection.

``Engine`` (``engine``) evaluates a batch of events, the proactive triggers and the
periodic work inside the caller's transaction; causal ordering (``ordering``), composite
triggers (``composite``) and acting on a firing (``acting``: trigd's own events, outbox
rows) are its parts.

Rules (``make lint`` enforces the imports, see ``[tool.importlinter]``):

* imports ``store`` and ``daemon.core`` (and itself); never ``daemon.wire``,
  ``daemon.runtime`` or ``daemon.cli``;
* synchronous, called inside the caller's transaction on the store thread: no trio,
  trio-websocket or httpx, and no clock: every entry point takes the wall clock ``now``.
"""
