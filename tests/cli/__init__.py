"""Tests of `daemon/cli/`: one `test_<module>.py` per module."""
