"""Node plugin "node.training": run the training stages the coordinator assigns to this node.

``install`` adds the ``PipelinePeer`` service (tensors from neighbour stages) to the peer
server; ``start`` runs a loop that polls the coordinator for assignments, starts a
:class:`~node.training.worker.StageWorker` per new assignment and stops workers of jobs the
coordinator ended; ``stop`` stops them all.
"""

from __future__ import annotations

import logging
import os
import threading

from swarm.errors import SwarmError
from swarm.proto.v1 import training_pb2_grpc as pb_grpc

from node.training.assignment import Assignment
from node.training.client import TrainingClient
from node.training.exchange import Endpoints, PipelinePeerServicer
from node.training.worker import StageWorker

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
# Benchmarks on hosts without tc/netns (e.g. gVisor GPU machines) emulate a link rate in the
# sender instead; read once here, at the plugin's edge, and passed down as a parameter.
EMULATE_LINK_ENV = "SWARM_EMULATE_LINK_MBIT"


class TrainingPlugin:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.endpoints = Endpoints()
        self.workers: dict[tuple[str, int], StageWorker] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client: TrainingClient | None = None
        try:
            self.emulate_link_bps = float(os.environ.get(EMULATE_LINK_ENV, "0") or 0) * 1e6
        except ValueError:
            log.warning("ignoring %s=%r: not a number", EMULATE_LINK_ENV, os.environ.get(EMULATE_LINK_ENV))
            self.emulate_link_bps = 0.0
        if self.emulate_link_bps:
            log.warning("emulating %.0f Mbit/s links to pipeline neighbours (benchmark setting)", self.emulate_link_bps / 1e6)

    def start(self) -> None:
        self.client = TrainingClient(self.agent)
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
            if not self.agent.wait_registered(1.0):
                continue
            try:
                self.poll_once()
            except SwarmError as exc:
                log.debug("assignment poll failed: %s", exc)
            except Exception:  # noqa: BLE001 -- the poll loop must survive
                log.exception("assignment poll crashed")
            self._stop.wait(POLL_INTERVAL_S)

    def poll_once(self) -> None:
        reply = self.client.poll()
        for job_id in reply.cancelled_job_ids:
            for (jid, _), w in self.workers.items():
                if jid == job_id:
                    w.stop("the coordinator ended the job")
        for m in reply.assignments:
            try:
                a = Assignment.from_pb(m)
            except (SwarmError, KeyError, ValueError) as exc:
                log.warning("ignoring a malformed assignment for job %s: %s", m.job_id, exc)
                continue
            if a.key in self.workers:
                continue
            for (jid, attempt), w in self.workers.items():  # an older attempt of the same job
                if jid == a.job_id and attempt != a.attempt:
                    w.stop("re-planned")
            worker = StageWorker(a, client=self.client, endpoints=self.endpoints, node_id=self.agent.node_id,
                                 device=self.agent.device, state_dir=self.agent.state_dir,
                                 on_metrics=self.agent.update_metrics, emulate_link_bps=self.emulate_link_bps,
                                 traffic=getattr(self.agent, "traffic", None))
            self.workers[a.key] = worker
            log.info("assignment received job=%s stage=%d replica=%d", a.job_id, a.stage, a.replica)
            worker.start()
        active = {(m.job_id, m.attempt) for m in reply.assignments}
        for key, w in list(self.workers.items()):
            if key not in active:
                if not w.done.is_set():
                    w.stop("no longer assigned (the job ended or was re-planned)")
                elif key[0] not in {m.job_id for m in reply.assignments}:
                    del self.workers[key]


_plugins: dict[int, TrainingPlugin] = {}


def install(server, agent) -> None:
    plugin = TrainingPlugin(agent)
    _plugins[id(agent)] = plugin
    pb_grpc.add_PipelinePeerServicer_to_server(PipelinePeerServicer(plugin.endpoints, traffic=getattr(agent, "traffic", None)), server)


def start(agent) -> None:
    _plugins[id(agent)].start()


def stop(agent) -> None:
    plugin = _plugins.pop(id(agent), None)
    if plugin is not None:
        plugin.stop()
