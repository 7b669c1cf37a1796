"""Node plugin: serve inference stages on the peer server (see node/inference/servicer.py)."""

from __future__ import annotations

import logging
import threading

import grpc

from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.errors import error_from_rpc

from node.inference.servicer import InferenceStageServicer

log = logging.getLogger(__name__)

_EXPIRE_INTERVAL_S = 5.0
_state: dict[int, tuple[InferenceStageServicer, threading.Event, list]] = {}


def install(server, agent) -> None:
    def open_coordinator_shard(req):
        stub = pb_grpc.InferenceGatewayStub(agent.coordinator_channel)
        return stub.FetchShard(req, metadata=agent.call_metadata(), timeout=600)

    def confirm(assignment) -> str | None:
        """The chain's step capability if the coordinator issued this assignment, else None."""
        stub = pb_grpc.InferenceGatewayStub(agent.coordinator_channel)
        try:
            reply = stub.ConfirmAssignment(pb.ServeConfirmRequest(assignment=assignment),
                                           metadata=agent.call_metadata(), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "coordinator") from exc
        return reply.step_capability if reply.confirmed and reply.step_capability else None

    servicer = InferenceStageServicer(
        node_id=agent.node_id,
        device=agent.device,
        state_dir=agent.state_dir,
        open_coordinator_shard=open_coordinator_shard,
        on_change=lambda m: agent.update_metrics(**m),
        confirm=confirm,
        traffic=getattr(agent, "traffic", None),
    )
    pb_grpc.add_InferenceStageServicer_to_server(servicer, server)
    _state[id(agent)] = (servicer, threading.Event(), [])


def start(agent) -> None:
    servicer, stop, threads = _state[id(agent)]

    def expire_loop() -> None:
        while not stop.wait(_EXPIRE_INTERVAL_S):
            try:
                if servicer.expire_sessions():
                    servicer._changed()
            except Exception:  # noqa: BLE001 -- the loop must survive
                log.exception("session expiry failed")

    t = threading.Thread(target=expire_loop, name="inference-expire", daemon=True)
    t.start()
    threads.append(t)


def stop(agent) -> None:
    entry = _state.pop(id(agent), None)
    if entry is None:
        return
    servicer, ev, threads = entry
    ev.set()
    for t in threads:
        t.join(timeout=5)
    servicer.close_all()
