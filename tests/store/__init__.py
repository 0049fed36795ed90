"""Tests of `store/`: one `test_<module>.py` per module, and `test_roundtrip.py`."""
