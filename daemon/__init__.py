"""trigd: an edge automation engine for Prefect-style events."""

__version__ = "0.1.0"
