"""Helpers shared by every engineer's tests (process start-up, polling, cleanup)."""
