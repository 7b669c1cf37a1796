"""Busy-polled reads for the step wire (swarm/transport/step_wire.py): who spins, for how long,
and when not at all.

Why: a chain's decode step crosses every stage's process twice (the step down, the reply back),
and a thread that blocked on its socket must be woken on a core that went idle. Measured on an
H200 host (docs/benchmarks.md, issue 16), a node reading its next message by busy-polling for up
to 10 ms cut a chain's extra stage from 0.99-1.04 to 0.81-0.84 ms per token. The price is one
core busy while steps come, so only GPU nodes with cores to spare spin by default.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

log = logging.getLogger(__name__)

SPIN_ENV = "SWARM_STEP_SPIN_US"
DEFAULT_GPU_SPIN_US = 10_000  # a decode step of a chain comes back within this on a GPU
MIN_CORES_TO_SPIN = 4


def spin_setting(device: str = "cpu", *, cores: int | None = None) -> float:
    """Seconds a node's step-wire reads busy-poll their socket before blocking: a node serving on
    a GPU with at least :data:`MIN_CORES_TO_SPIN` cores spins :data:`DEFAULT_GPU_SPIN_US` (one core
    busy while steps come; measured on an H200, docs/benchmarks.md: a chain's extra stage costs
    ~0.1-0.3 ms less per token); others block at once (a CPU node needs its cores for compute).
    ``SWARM_STEP_SPIN_US`` (microseconds, 0 to 100000) overrides either."""
    raw = os.environ.get(SPIN_ENV, "")
    if raw:
        try:
            return max(0.0, min(float(raw), 1e5)) / 1e6
        except ValueError:
            log.warning("%s=%r is not a number of microseconds; using the default", SPIN_ENV, raw)
    cores = (os.cpu_count() or 1) if cores is None else cores
    return DEFAULT_GPU_SPIN_US / 1e6 if device.startswith("cuda") and cores >= MIN_CORES_TO_SPIN else 0.0


MAX_ENDPOINTS_TO_SPIN = 2  # one chain through this process: the connection from its previous stage, the link to its next


class _Endpoints:
    """Step-wire connections open in this process, served and dialled. Reads spin only while at
    most :data:`MAX_ENDPOINTS_TO_SPIN` are open (one chain runs through the process, and its one
    thread does all the waiting): with more, a spinning thread would keep another connection's
    thread waiting for the GIL (up to the interpreter's 5 ms switch interval) in its compute."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


ENDPOINTS = _Endpoints()


def wait_readable(sock, spin_s: float) -> None:
    """Busy-poll ``sock`` for up to ``spin_s`` seconds before the caller's blocking read: a
    message arriving meanwhile is read by a thread that never slept (no wake-up on an idle core).
    Each poll releases the GIL; no spin at all while more than one chain's connections are open
    in this process (:class:`_Endpoints`)."""
    if spin_s <= 0 or ENDPOINTS.count > MAX_ENDPOINTS_TO_SPIN or (hasattr(sock, "pending") and sock.pending()):
        return
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        if poller.poll(0):
            return
