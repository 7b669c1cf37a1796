"""Progress reports to the coordinator from a background thread (never in a step's time).

Reports go in order. While the coordinator is unreachable or restarting (it no longer knows the
node's session until the agent registers again), the report at the head of the queue is
retried with backoff and the others wait behind it, so nothing reported is lost; training goes
on meanwhile. An outage longer than ``outage_s`` drops reports (logged) rather than block.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from swarm.errors import SwarmError
from swarm.proto.v1 import training_pb2 as pb

from node.training.membership import DEFAULT_OUTAGE_S, is_outage

log = logging.getLogger(__name__)


class Reporter:
    """Sends ProgressReports in order; an answer with ``stop`` calls ``on_stop(reason)``; every
    answer goes to ``on_ack(ack)`` (the fences' flags)."""

    def __init__(self, client, assignment, *, on_stop, on_ack=None, outage_s: float = DEFAULT_OUTAGE_S,
                 stop: threading.Event | None = None) -> None:
        self._stop = stop or threading.Event()  # set: give up retrying (the worker is stopping)
        self.client = client
        self.a = assignment
        self.on_stop = on_stop
        self.on_ack = on_ack or (lambda ack: None)
        self.outage_s = outage_s
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def progress(self, report: pb.ProgressReport) -> None:
        try:
            self._queue.put_nowait(report)
        except queue.Full:  # the coordinator is far behind: drop a report rather than stall training
            log.warning("progress queue full; dropping the report of step %d", report.step)

    def _send(self, report: pb.ProgressReport, *, retry: bool = True) -> bool:
        """Send one report, retrying through an outage; False when it could not be delivered."""
        deadline = time.monotonic() + self.outage_s
        backoff = 0.2
        while True:
            try:
                ack = self.client.report(report)
                break
            except SwarmError as exc:
                if not (retry and is_outage(exc)) or time.monotonic() + backoff > deadline or self._stop.is_set():
                    log.warning("progress report of step %d failed: %s", report.step, exc)
                    return False
                log.debug("coordinator unreachable, report of step %d kept: %s", report.step, exc)
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
        self.on_ack(ack)
        if ack.stop:
            self.on_stop(ack.reason)
        return True

    def _run(self) -> None:
        while True:
            report = self._queue.get()
            try:
                if report is None:
                    return
                self._send(report)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued report was sent (or given up); False on timeout."""
        deadline = time.monotonic() + (self.outage_s if timeout_s is None else timeout_s)
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def final(self, *, state: str, error: str = "", blame_node_id: str = "") -> None:
        """Flush queued reports, then send the final state synchronously (retried through an outage;
        ``blame_node_id``: the neighbour that stopped answering, when that is why it failed)."""
        self.close()
        a = self.a
        self._send(pb.ProgressReport(job_id=a.job_id, attempt=a.attempt, stage=a.stage, replica=a.replica, step=-1,
                                     state=state, error=error[:2000], blame_node_id=blame_node_id))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=self.outage_s + 15)
