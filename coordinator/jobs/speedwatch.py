"""Carries out coordinator/jobs/speed.py's decisions for the job service: folds each progress
report's neighbour intervals into the attempt's :class:`~coordinator.jobs.speed.SpeedBook`,
updates the seen node's running estimate in the trust store (``observed_tflops``: planned
TFLOPS x relative speed, what the next plan and the plan preview use), and records a job event
``slow_node`` (with the figures) when a node stays below half its planned speed.

Not done here: the job is not re-planned on a ``slow_node`` (a re-plan costs a restart from the
last checkpoint; the event and the lowered estimate make the next re-plan, for any reason, use
what was seen).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from coordinator.jobs.speed import SLOW_RATIO, SpeedBook, neighbour_views
from swarm.model.config import ModelConfig

log = logging.getLogger(__name__)


class SpeedWatch:
    """Thread-safe. ``registry``: the app's (``get(node_id).planning_tflops``, ``trust``)."""

    def __init__(self, *, store, registry, clock) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self._lock = threading.Lock()
        # (job, attempt) -> (book, planned TFLOPS per node as planned, FLOPs per token and layer)
        self._books: dict[tuple[str, int], tuple[SpeedBook, dict[str, float], float]] = {}

    def _book(self, job) -> tuple[SpeedBook, dict[str, float], float]:
        key = (job.id, job.attempt)
        got = self._books.get(key)
        if got is None:
            for k in [k for k in self._books if k[0] == job.id]:
                del self._books[k]  # an older attempt's
            planned = {}
            for a in job.assignments:
                try:
                    planned[a["node_id"]] = float(self.registry.get(a["node_id"]).planning_tflops)
                except Exception:  # noqa: BLE001 -- gone from the registry: not compared
                    pass
            cfg = ModelConfig.from_hf_config(job.model)
            per_layer = 6.0 * cfg.num_parameters() / cfg.num_layers + 12.0 * job.spec.seq_len * cfg.hidden_size
            got = self._books[key] = (SpeedBook(), planned, per_layer)
        return got

    def report(self, job, reporter: dict[str, Any], r: dict[str, Any]) -> None:
        """A running step's report by the worker of assignment ``reporter``."""
        if not (r.get("activation_interval_s") or r.get("gradient_interval_s")):
            return
        with self._lock:
            book, planned, per_layer = self._book(job)
            views = neighbour_views(r, reporter, job.assignments, flops_per_token_per_layer=per_layer,
                                    tokens_per_micro_batch=job.spec.micro_batch_size * job.spec.seq_len)
            now = self.clock.time()
            found = []
            for node_id, direction, tflops in views:
                book.add(node_id, direction, tflops)
                rel, slow = book.observe(node_id, planned, now)
                found.append((node_id, rel, slow, book.seen().get(node_id, 0.0)))
        for node_id, rel, slow, seen in found:
            if rel is None or node_id not in planned:
                continue
            try:
                self.registry.trust.observe(node_id, planned[node_id] * min(1.0, rel))
            except Exception:  # noqa: BLE001 -- the estimate is advisory; never fail a report on it
                log.exception("could not record the observed speed of node=%s", node_id[:12])
            if slow:
                a = next((x for x in job.assignments if x["node_id"] == node_id), {})
                msg = (f"node {node_id[:12]} (stage {a.get('stage')} replica {a.get('replica')}) runs at "
                       f"{rel:.2f}x its planned speed relative to the job's other nodes (below {SLOW_RATIO:g}x), "
                       f"as its neighbours see it: {seen:.4g} TFLOPS seen, {planned[node_id]:.4g} planned; "
                       "the next plan uses what was seen")
                log.warning("slow node job=%s %s", job.id, msg)
                self.store.add_event(job.id, "slow_node", msg, node_id=node_id, stage=a.get("stage"),
                                     replica=a.get("replica"), relative_speed=round(rel, 4),
                                     seen_tflops=seen, planned_tflops=planned[node_id], attempt=job.attempt)
