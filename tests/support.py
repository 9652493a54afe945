"""Constants the tests share (fixtures are in conftest.py)."""

BANDWIDTH = 1e9
"""Bytes/s for every test audit: estimated seconds become deterministic and no transpose is timed."""
