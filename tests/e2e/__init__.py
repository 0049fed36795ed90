"""Whole-daemon tests: `trigd` as real processes (crash, signals, TLS, packaging, Prefect's
client, a full disk, hostile clients and endpoints)."""
