"""``make chaos``: runs of many episodes under injected faults (tests/chaos/harness.py)."""
