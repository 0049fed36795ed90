"""The ``/events/in`` websocket protocol without I/O: handshake, auth, frames and replies.

Pure functions of the bytes and messages a client sent (``handshake``), and the encoding
of websocket frames trigd writes or decodes itself (``wsframes``); ``daemon.runtime``
does the sockets.

Rules (``make lint`` enforces the imports, see ``[tool.importlinter]``):

* imports only ``daemon.core`` (and itself); never ``store``, ``daemon.engine``,
  ``daemon.runtime`` or ``daemon.cli``;
* no trio, trio-websocket, httpx or apsw, and no clock: the time a frame was received is
  passed in.
"""
