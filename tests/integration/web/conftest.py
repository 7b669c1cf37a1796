"""Fixtures of the status page's tests (helpers in web_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.chromium import find_chromium
from tests.integration.web.web_helpers import BrowserThread, Coordinator, start_coordinator


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """The coordinator with only the web plugin (no jobs: the page must cope)."""
    c = start_coordinator(tmp_path, ("coordinator.web",))
    try:
        yield c
    finally:
        c.app.stop(grace_s=0.1)


@pytest.fixture
def coordinator_with_jobs(tmp_path: Path) -> Iterator[Coordinator]:
    """The coordinator with the web and jobs plugins."""
    c = start_coordinator(tmp_path, ("coordinator.web", "coordinator.jobs"))
    try:
        yield c
    finally:
        c.app.stop(grace_s=0.1)


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium: apt-get install chromium (scripts/setup.sh installs it when run as root)")
    bt = BrowserThread(exe)
    try:
        yield bt
    finally:
        bt.close()
