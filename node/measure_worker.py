"""The node agent's measurement worker (:class:`MeasureWorker`, a part of
:class:`node.agent.NodeAgent`): one thread that runs what the coordinator asks it to measure,
one task at a time, so that probes and the compute challenge never overlap.

- Link measurements come in heartbeat replies (``MeasurementTask``): ping and time a probe to the
  destination node (node/measure.py), then send a ``MeasurementReport`` with the RTT and
  bandwidth, or with the error; a task that finds no session (the node is re-registering) is
  dropped.
- :data:`CHALLENGE_TASK` is queued at each registration: the coordinator's compute challenge
  (swarm/challenge.py), which the coordinator times and keeps.

A failed measurement is reported, never raised: the worker stays alive. The host class provides
``_stop``, ``_tasks`` (the queue), ``_session`` with ``_session_lock``, ``_link``, ``security``,
``heartbeat_interval_s``, ``traffic``, ``device`` and ``hardware``.
"""

from __future__ import annotations

import logging
import queue

from swarm.errors import SwarmError
from swarm.proto.v1 import coordinator_pb2 as pb

from node.measure import measure_link

log = logging.getLogger(__name__)
CHALLENGE_TASK = object()  # marker in the measurement queue: run the compute challenge


class MeasureWorker:
    """The measurement thread of :class:`~node.agent.NodeAgent` (``_measure_worker``)."""

    def _measure_worker(self) -> None:
        while not self._stop.is_set():
            try:
                task = self._tasks.get(timeout=0.2)
            except queue.Empty:
                continue
            if task is CHALLENGE_TASK:
                self._run_challenge()
                continue
            report = pb.MeasurementReport(task_id=task.task_id, dst_node_id=task.dst_node_id)
            try:
                sample = measure_link(task.dst_address, probe_bytes=int(task.probe_bytes),
                                      num_pings=int(task.num_pings), expected_node_id=task.dst_node_id,
                                      security=self.security,
                                      # the destination learns of the task on its next heartbeat
                                      authorize_wait_s=3 * self.heartbeat_interval_s + 1.0,
                                      task_id=task.task_id)
                self.traffic.add_sent(sample.probe_bytes)
                report.rtt_s = sample.rtt_s
                report.bandwidth_Bps = sample.bandwidth_Bps
                report.probe_bytes = sample.probe_bytes
            except SwarmError as exc:
                report.error = str(exc)[:1000]
            except Exception as exc:  # noqa: BLE001 -- report, keep the worker alive
                log.exception("measurement to %s failed", task.dst_address)
                report.error = f"{type(exc).__name__}: {exc}"[:1000]
            with self._session_lock:
                session = self._session
            if session is None:
                continue
            try:
                self._link.report(session, report)
            except SwarmError as exc:
                log.warning("could not report measurement: %s", exc)

    def _run_challenge(self) -> None:
        """The coordinator's compute challenge (swarm/challenge.py): it times it and keeps the result."""
        with self._session_lock:
            session = self._session
        if session is None:
            return
        try:
            result = self._link.run_challenge(session, device=self.device)
            if result.passed:
                log.info("compute challenge passed measured_tflops=%.4f (probe said %.4f)", result.measured_tflops,
                         self.hardware.tflops)
            else:
                log.error("compute challenge failed: %s", result.message)
        except SwarmError as exc:
            log.warning("compute challenge did not complete: %s", exc)
        except Exception:  # noqa: BLE001 -- keep the worker alive
            log.exception("compute challenge crashed")
