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

import sys as _sys

# httpx imports its own command line (click, rich, pygments: about 4 MB of memory) whenever
# those happen to be installed, and trigd never runs it. None in sys.modules makes that
# import fail, a case httpx handles (its command line is the optional extra httpx[cli]).
_sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # None: "not importable"
