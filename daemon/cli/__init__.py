"""The ``trigd`` command line: the parser (``main``) and one module per subcommand.

``main`` imports each subcommand lazily, so that ``trigd check`` on a small edge box does
not pay for trio and httpx; ``trigd serve`` is ``daemon.runtime.service``. Client commands
do their own I/O (``emit`` is a trio websocket client; ``status`` and ``outbox`` open the
database).

Rules (``make lint`` enforces the imports, see ``[tool.importlinter]``): the top layer; it
may import every other layer, and nothing imports it except ``daemon.__main__``.
"""
