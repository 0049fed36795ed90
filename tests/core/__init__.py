"""Tests of `daemon/core/`: one `test_<module>.py` per module."""
