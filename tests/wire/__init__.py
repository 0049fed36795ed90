"""Tests of `daemon/wire/`: one `test_<module>.py` per module."""
