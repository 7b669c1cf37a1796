"""Per-node peer traffic accounting and transfer observations (one object per NodeAgent).

``agent.traffic`` (``host.traffic`` for plugins, see :mod:`node.plugins`) counts the bytes this node exchanges with peers (pipeline tensors,
inference hidden states, bandwidth probes and shards served to or fetched from peers):
``add_sent(n)`` / ``add_received(n)`` from any thread; ``totals()`` gives running
``bytes_sent`` / ``bytes_received`` since the node process started, reported with every
heartbeat as metrics.

``observe(dst_node_id, num_bytes, seconds)`` records a real transfer to a peer when it is
large enough to say something about the link (``MIN_OBSERVED_BYTES``); the newest
``MAX_OBSERVATIONS`` travel with the next heartbeat (``drain()``), and the coordinator turns
them into ``source="transfer"`` links (see coordinator/network.py ``transfer_link``).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

MIN_OBSERVED_BYTES = 256 << 10
MAX_OBSERVATIONS = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferObservation:
    dst_node_id: str
    num_bytes: int
    seconds: float

    def __post_init__(self) -> None:
        if self.num_bytes <= 0 or not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError("a transfer observation needs num_bytes > 0 and finite seconds > 0")


class Traffic:
    """Thread-safe running byte totals and a bounded queue of transfer observations."""

    def __init__(self, *, min_observed_bytes: int = MIN_OBSERVED_BYTES, max_observations: int = MAX_OBSERVATIONS) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._received = 0
        self.min_observed_bytes = int(min_observed_bytes)
        self._observations: deque[TransferObservation] = deque(maxlen=max_observations)

    def add_sent(self, num_bytes: int) -> None:
        if num_bytes > 0:
            with self._lock:
                self._sent += int(num_bytes)

    def add_received(self, num_bytes: int) -> None:
        if num_bytes > 0:
            with self._lock:
                self._received += int(num_bytes)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {"bytes_sent": self._sent, "bytes_received": self._received}

    def observe(self, dst_node_id: str, num_bytes: int, seconds: float) -> bool:
        """Keep a transfer to ``dst_node_id`` as a link observation; False when too small or unusable."""
        if not dst_node_id or num_bytes < self.min_observed_bytes or not (math.isfinite(seconds) and seconds > 0):
            return False
        with self._lock:
            self._observations.append(TransferObservation(dst_node_id=dst_node_id, num_bytes=int(num_bytes),
                                                          seconds=float(seconds)))
        return True

    def drain(self) -> list[TransferObservation]:
        """The pending observations (oldest first), emptying the queue."""
        with self._lock:
            out = list(self._observations)
            self._observations.clear()
        return out
