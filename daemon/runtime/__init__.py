"""The running daemon: trio tasks, the store thread, the network and the wall clock.

``service`` starts and supervises the tasks: ingest (``ingest``, ``connection``), the
evaluator (``evaluator``), the sweeper (``sweeper``) and the webhook sender (``sender``);
the store is reached through one worker thread (``gateway``), store trouble is waited out
(``store_trouble``), and systemd is notified (``systemd``).

Rules (``make lint`` enforces the imports, see ``[tool.importlinter]``):

* the only home of trio, threads, httpx and reading the wall clock in the daemon; the
  layers below take ``now`` from here;
* may import ``daemon.engine``, ``daemon.wire``, ``store`` and ``daemon.core``; never
  ``daemon.cli``.
"""
