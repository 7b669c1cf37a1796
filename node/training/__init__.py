"""Node plugin "node.training": run the training stages the coordinator assigns to this node.

``create(host)`` returns a :class:`TrainingPlugin`. ``install`` adds the ``PipelinePeer``
service (tensors from neighbour stages) to the peer server; ``start`` runs a loop that polls the
coordinator for assignments, asks :func:`node.training.reconcile.reconcile` what to do about
them (start a :class:`~node.training.worker.StageWorker` per new assignment, stop workers of jobs
the coordinator ended or re-planned, forget finished ones) and does it; ``stop`` stops them all.
"""

from __future__ import annotations

import logging
import os
import threading

from swarm.errors import SwarmError
from swarm.proto.v1 import training_pb2_grpc as pb_grpc

from node.plugins import NodeHost, NodePlugin
from node.training.assignment import Assignment
from node.training.client import TrainingClient
from node.training.exchange import Endpoints, PipelinePeerServicer
from node.training.membership import DEFAULT_OUTAGE_S
from node.training.state_copy import StateServer
from node.training.reconcile import (
    Action, ForgetWorker, PollView, StartWorker, StopWorker, WorkerKey, WorkerView, reconcile,
)
from node.training.worker import StageWorker

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
# Benchmarks on hosts without tc/netns (e.g. gVisor GPU machines) emulate a link rate in the
# sender instead; read once here, at the plugin's edge, and passed down as a parameter.
EMULATE_LINK_ENV = "SWARM_EMULATE_LINK_MBIT"
# How long stage workers keep training while the coordinator is unreachable (restarting):
# reports and checkpoint uploads are queued and re-sent meanwhile. Read here, at the edge.
OUTAGE_ENV = "SWARM_COORDINATOR_OUTAGE_S"


class TrainingPlugin(NodePlugin):
    def __init__(self, host: NodeHost) -> None:
        self.host = host
        self.endpoints = Endpoints()
        self.workers: dict[WorkerKey, StageWorker] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client: TrainingClient | None = None
        try:
            self.emulate_link_bps = float(os.environ.get(EMULATE_LINK_ENV, "0") or 0) * 1e6
        except ValueError:
            log.warning("ignoring %s=%r: not a number", EMULATE_LINK_ENV, os.environ.get(EMULATE_LINK_ENV))
            self.emulate_link_bps = 0.0
        try:
            self.outage_s = float(os.environ.get(OUTAGE_ENV, "") or DEFAULT_OUTAGE_S)
        except ValueError:
            log.warning("ignoring %s=%r: not a number", OUTAGE_ENV, os.environ.get(OUTAGE_ENV))
            self.outage_s = DEFAULT_OUTAGE_S
        if self.emulate_link_bps:
            log.warning("emulating %.0f Mbit/s links to pipeline neighbours (benchmark setting)", self.emulate_link_bps / 1e6)

    def install(self, server) -> None:
        state = StateServer(node_id=self.host.node_id, state_dir=self.host.state_dir,
                            assignment_of=self._assignment_of)  # FetchStageState: replicas copy our state
        peer = PipelinePeerServicer(self.endpoints, traffic=self.host.traffic,
                                    identify=self.host.security.peer_identity, state_server=state)
        pb_grpc.add_PipelinePeerServicer_to_server(peer, server)
        server.add_generic_rpc_handlers((peer.stream_receiver().handler(),))  # persistent tensor streams

    def _assignment_of(self, job_id: str) -> Assignment | None:
        """This node's newest running assignment of ``job_id`` (for FetchStageState)."""
        mine = [w.a for w in list(self.workers.values()) if w.a.job_id == job_id and not w.stop_event.is_set()]
        return max(mine, key=lambda a: a.attempt) if mine else None

    def start(self) -> None:
        self.client = TrainingClient(self.host)
        self._thread = threading.Thread(target=self._loop, name="training-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for w in list(self.workers.values()):
            w.stop("node stopping")
        for w in list(self.workers.values()):
            w.join(10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.host.wait_registered(1.0):
                continue
            try:
                self.poll_once()
            except SwarmError as exc:
                log.debug("assignment poll failed: %s", exc)
            except Exception:  # noqa: BLE001 -- the poll loop must survive
                log.exception("assignment poll crashed")
            self._stop.wait(POLL_INTERVAL_S)

    def poll_once(self) -> None:
        """Poll the coordinator once and carry out what :func:`reconcile` decides."""
        reply = self.client.poll()
        assignments, unreadable = [], set()
        for m in reply.assignments:
            try:
                assignments.append(Assignment.from_pb(m))
            except (SwarmError, KeyError, ValueError) as exc:
                log.warning("ignoring a malformed assignment for job %s: %s", m.job_id, exc)
                unreadable.add((m.job_id, m.attempt))
        poll = PollView(assignments=tuple(assignments), unreadable_keys=frozenset(unreadable),
                        cancelled_job_ids=frozenset(reply.cancelled_job_ids))
        for action in reconcile(poll, self.snapshot()):
            self._apply(action)
        for a in assignments:  # a fence reaches workers blocked in a step (averaging, waiting) this way too
            worker = self.workers.get(a.key)
            if worker is not None and a.fence:
                worker.on_fence(a.switch_step, all_live=a.fence_all_live, live_members=a.fence_live_members,
                                dropped=a.fence_dropped)

    def snapshot(self) -> tuple[WorkerView, ...]:
        return tuple(WorkerView(job_id=job_id, attempt=attempt, done=w.done.is_set(), stopping=w.stop_event.is_set())
                     for (job_id, attempt), w in self.workers.items())

    def _apply(self, action: Action) -> None:
        if isinstance(action, StopWorker):
            self.workers[action.key].stop(action.reason)
        elif isinstance(action, ForgetWorker):
            del self.workers[action.key]
        elif isinstance(action, StartWorker):
            a = action.assignment
            worker = StageWorker(a, client=self.client, endpoints=self.endpoints, node_id=self.host.node_id,
                                 device=self.host.device, state_dir=self.host.state_dir,
                                 on_metrics=self.host.update_metrics, emulate_link_bps=self.emulate_link_bps,
                                 traffic=self.host.traffic, security=self.host.security, outage_s=self.outage_s,
                                 faults=self.host.faults)
            self.workers[a.key] = worker
            log.info("assignment received job=%s stage=%d replica=%d", a.job_id, a.stage, a.replica)
            worker.start()
        else:  # pragma: no cover -- reconcile returns only the actions above
            raise AssertionError(f"unknown action {action!r}")


def create(host: NodeHost) -> TrainingPlugin:
    return TrainingPlugin(host)
