"""Logging set-up for CLI entry points only. Library modules just call logging.getLogger(__name__)."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys


def configure(level: str | int = "INFO", *, stream=None) -> None:
    """Send log records to stderr (stdout is kept for CLI output and READY lines)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hivemind configures its own loggers; keep them quieter than ours.
    logging.getLogger("hivemind").setLevel(max(level, logging.WARNING))


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes every thread's stack to stderr (the log) and the process goes on:
    what a hung coordinator or node is waiting on (README.md). Services only."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
