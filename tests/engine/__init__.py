"""Tests of `daemon/engine/`: one `test_<module>.py` per module, and behaviours of the engine
(`test_engine_<behaviour>.py`, `test_hot_path.py`)."""
