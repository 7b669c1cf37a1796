"""Carries out coordinator/jobs/speed.py's decisions for the job service: folds each progress
report's waits for its neighbours into the attempt's :class:`~coordinator.jobs.speed.SpeedBook`,
updates the seen node's running estimate in the trust store (``observed_tflops``: planned
TFLOPS x relative speed, what the next plan and the plan preview use), and records a job event
``slow_node`` (with the figures) when a node stays below half its planned speed.

What happens next is decided elsewhere: the job loop reads :meth:`SpeedWatch.slow_now` and
:meth:`SpeedWatch.seen` and may re-balance the job's layers around the slow node through a fence,
without rollback (coordinator/jobs/rebalance.py decides, coordinator/jobs/fencing.py carries it
out; job event ``rebalance``). Either way the lowered estimate makes the next plan, for any
reason, use what was seen.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from coordinator.jobs.speed import EMA, SLOW_RATIO, SpeedBook, neighbour_views, relative_speeds

log = logging.getLogger(__name__)


class SpeedWatch:
    """Thread-safe. ``registry``: the app's (``get(node_id).planning_tflops``, ``trust``)."""

    def __init__(self, *, store, registry, clock) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self._lock = threading.Lock()
        # (job, attempt) -> (book, planned TFLOPS per node, read when the attempt's first report came)
        self._books: dict[tuple[str, int], tuple[SpeedBook, dict[str, float]]] = {}
        self._first_s: dict[tuple[str, int], float] = {}  # (job, attempt) -> when its first report came
        self._step_s: dict[tuple[str, int], float] = {}  # (job, attempt) -> EMA of the workers' step times

    def _book(self, job) -> tuple[SpeedBook, dict[str, float]]:
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
            got = self._books[key] = (SpeedBook(), planned)
            self._first_s = {k: v for k, v in self._first_s.items() if k[0] != job.id}
            self._step_s = {k: v for k, v in self._step_s.items() if k[0] != job.id}
            self._first_s[key] = self.clock.time()
        return got

    def seen(self, job) -> tuple[dict[str, float], dict[str, float]]:
        """For ``job``'s current attempt: (per node, TFLOPS as seen: planned x relative speed, at
        most planned; planned where not seen yet), (per node seen, relative speed)."""
        with self._lock:
            got = self._books.get((job.id, job.attempt))
            if got is None:
                return {}, {}
            book, planned = got
            rel = relative_speeds(book.imposed())
        return {n: p * min(1.0, rel.get(n, 1.0)) for n, p in planned.items()}, rel

    def slow_now(self, job) -> list[str]:
        """Nodes of ``job``'s current attempt reported slow (``slow_node``) and still below."""
        with self._lock:
            got = self._books.get((job.id, job.attempt))
            if got is None:
                return []
            return sorted(n for n, st in got[0].slow.items() if st.reported and st.since_s is not None)

    def step_s(self, job) -> float | None:
        """A running estimate (EMA) of the step time ``job``'s workers report in this attempt."""
        with self._lock:
            return self._step_s.get((job.id, job.attempt))

    def attempt_age_s(self, job) -> float:
        """How long ago ``job``'s current attempt sent its first report (0 before it did)."""
        with self._lock:
            first = self._first_s.get((job.id, job.attempt))
        return 0.0 if first is None else max(0.0, self.clock.time() - first)

    def report(self, job, reporter: dict[str, Any], r: dict[str, Any]) -> None:
        """A running step's report by the worker of assignment ``reporter``. Never raises: the
        estimate is advisory, the report it came with must count."""
        try:
            self._report(job, reporter, r)
        except Exception:  # noqa: BLE001
            log.exception("neighbour-seen speed failed job=%s", job.id)

    def _report(self, job, reporter: dict[str, Any], r: dict[str, Any]) -> None:
        with self._lock:
            book, planned = self._book(job)
            now = self.clock.time()
            step_s = r.get("step_s")
            if isinstance(step_s, (int, float)) and math.isfinite(step_s) and step_s > 0:
                key = (job.id, job.attempt)
                prev = self._step_s.get(key)
                self._step_s[key] = step_s if prev is None else (1 - EMA) * prev + EMA * step_s
            found = []
            for node_id, direction, q in neighbour_views(r, reporter, job.assignments):
                book.add(node_id, direction, q)
                rel, slow = book.observe(node_id, now)
                found.append((node_id, rel, slow, book.imposed().get(node_id, 0.0)))
        for node_id, rel, slow, imposed in found:
            log.debug("neighbour-seen speed job=%s node=%s imposed_wait=%.3f relative=%s", job.id, node_id[:12],
                      imposed, "-" if rel is None else f"{rel:.3f}")
            if rel is None or node_id not in planned:
                continue
            seen = planned[node_id] * min(1.0, rel)
            try:
                self.registry.trust.observe(node_id, seen)
            except Exception:  # noqa: BLE001 -- the estimate is advisory; never fail a report on it
                log.exception("could not record the observed speed of node=%s", node_id[:12])
            if rel >= SLOW_RATIO:
                self.registry.trust.mark_slow(node_id, "")  # seen at pace again
            if slow:
                a = next((x for x in job.assignments if x["node_id"] == node_id), {})
                msg = (f"node {node_id[:12]} (stage {a.get('stage')} replica {a.get('replica')}) runs at "
                       f"{rel:.2f}x its planned speed relative to the job's other nodes (below {SLOW_RATIO:g}x), "
                       f"as its neighbours see it (they wait {imposed:.0%} of their step for it): {seen:.4g} "
                       f"TFLOPS seen, {planned[node_id]:.4g} planned; "
                       "the next plan uses what was seen; the job re-balances its layers if that pays")
                log.warning("slow node job=%s %s", job.id, msg)
                self.registry.trust.mark_slow(node_id, f"job {job.id}: {msg}")
                self._event(job, msg, node_id=node_id, stage=a.get("stage"),
                            replica=a.get("replica"), relative_speed=round(rel, 4),
                            neighbour_wait_fraction=round(imposed, 4),
                            seen_tflops=seen, planned_tflops=planned[node_id], attempt=job.attempt)

    def _event(self, job, msg: str, **fields) -> None:
        try:
            self.store.add_event(job.id, "slow_node", msg, **fields)
        except Exception:  # noqa: BLE001 -- never fail the reporting worker's progress on it
            log.exception("could not record a slow_node event job=%s", job.id)
