"""trigd's core: the data models and the pure decisions made on them.

What is here: events and their parsing, resource matching, triggers, actions and
automations (and their file loader), firings, the bucket arithmetic, the delivery state
table and retry policy, connection slots, log throttling, secret references, webhook
templates, the trigger index, the configuration and its loader, microsecond time
arithmetic and the events clock, the counters snapshot format, and the exit codes.

Rules (``make lint`` enforces the imports, see ``[tool.importlinter]``):

* imports nothing of trigd outside ``daemon.core``; every other layer may import it;
* no trio, trio-websocket, httpx or apsw: nothing here does network or database I/O
  (the configuration and automation loaders read the files they are given);
* no clock: a decision that depends on time takes it as an argument. ``clock.wall_clock``
  is defined here for the layers that read the wall clock, and used here only as the
  default of ``ReceivedEvent.received`` (Prefect's model), which ingest always sets.
"""
