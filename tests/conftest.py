"""Shared pytest configuration. Every test has a timeout (pyproject: timeout = 120)."""
