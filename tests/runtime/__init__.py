"""Tests of `daemon/runtime/`: its tasks in-process on 127.0.0.1, one `test_<module>.py` per
module, and behaviours across them (`test_connection_limits.py`, `test_sender_secrets.py`)."""
