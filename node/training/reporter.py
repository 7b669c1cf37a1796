"""Progress reports to the coordinator from a background thread (never in a step's time)."""

from __future__ import annotations

import logging
import queue
import threading

from swarm.errors import SwarmError
from swarm.proto.v1 import training_pb2 as pb

log = logging.getLogger(__name__)


class Reporter:
    """Sends ProgressReports in order; an answer with ``stop`` calls ``on_stop(reason)``."""

    def __init__(self, client, assignment, *, on_stop) -> None:
        self.client = client
        self.a = assignment
        self.on_stop = on_stop
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def progress(self, report: pb.ProgressReport) -> None:
        try:
            self._queue.put_nowait(report)
        except queue.Full:  # the coordinator is far behind: drop a report rather than stall training
            log.warning("progress queue full; dropping the report of step %d", report.step)

    def _send(self, report: pb.ProgressReport) -> None:
        try:
            ack = self.client.report(report)
        except SwarmError as exc:
            log.warning("progress report failed: %s", exc)
            return
        if ack.stop:
            self.on_stop(ack.reason)

    def _run(self) -> None:
        while True:
            report = self._queue.get()
            if report is None:
                return
            self._send(report)

    def final(self, *, state: str, error: str = "", blame_node_id: str = "") -> None:
        """Flush queued reports, then send the final state synchronously (``blame_node_id``: the
        neighbour that stopped answering, when that is why it failed)."""
        self.close()
        a = self.a
        self._send(pb.ProgressReport(job_id=a.job_id, attempt=a.attempt, stage=a.stage, replica=a.replica, step=-1,
                                     state=state, error=error[:2000], blame_node_id=blame_node_id))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=15)
