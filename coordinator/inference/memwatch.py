"""Memory-bandwidth claims checked against the decode steps the coordinator sees (docs/security.md,
memory bandwidth).

A decode step of b sessions on a stage reads the stage's weights once and each session's KV
cache: at the batch sizes served it is memory-bound, so its time is at least those bytes over the
node's memory bandwidth. Every chain's step reply carries each stage's compute time
(``ServeStepReply.stage_compute_s``, the times the live route map of routes.py also keeps); for a
decode step, :func:`swarm.scheduling.disaggregation.seen_stage_bandwidths` turns them into a lower
bound of each node's bandwidth, and the trust store keeps the highest (``observe_mem_bandwidth``).
``NodeInfo.planning_mem_bandwidth_Bps`` then believes a claim no further than
MEM_BANDWIDTH_SEEN_SLACK x that (swarm.membership.effective_mem_bandwidth), and ``swarm status``
shows it (``mem_bandwidth_seen_Bps``).

The times are the stages' own reports (a later stage could alter an earlier one's on the way
back): keeping the highest means a forged slow time lowers nothing, and a node that forges its own
times fast gains no more than an unchecked claim had.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from swarm.inference.stage_runtime import StepEntry
from swarm.scheduling.disaggregation import seen_stage_bandwidths
from swarm.scheduling.placement import ModelShape

from coordinator.inference.sessions import StageRef

log = logging.getLogger(__name__)

DecodeObserver = Callable[[Sequence[StageRef], Sequence[StepEntry], Sequence[float]], None]


class MemBandwidthWatch:
    """Feeds the trust store from decode steps. Thread-safe (the store is)."""

    def __init__(self, trust: Callable[[], object]) -> None:
        self._trust = trust  # -> the registry's coordinator.verification.TrustStore

    def observer(self, shape: ModelShape) -> DecodeObserver:
        """The callback a chain of a model of ``shape`` calls after each decode step with its
        stages, the step's entries and each stage's compute time (first stage first)."""
        def observe(stages: Sequence[StageRef], entries: Sequence[StepEntry], compute_s: Sequence[float]) -> None:
            try:
                seen = seen_stage_bandwidths(shape, stages=[(s.first_layer, s.last_layer_excl) for s in stages],
                                             context_tokens=[e.start_position + e.num_tokens for e in entries],
                                             compute_s=compute_s)
                for st, bw in zip(stages, seen):
                    if bw is not None:
                        self._trust().observe_mem_bandwidth(st.node_id, bw)
            except Exception:  # noqa: BLE001 -- a statistic must never fail a serving step
                log.debug("memory bandwidth observation failed", exc_info=True)
        return observe
