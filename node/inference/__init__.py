"""Node plugin: serve inference stages on the peer server (see node/inference/servicer.py)."""

from __future__ import annotations

import logging
import threading

import grpc

from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.errors import error_from_rpc
from swarm.transport.step_wire import WireServer

from node.inference.servicer import InferenceStageServicer
from node.plugins import NodeHost, NodePlugin

log = logging.getLogger(__name__)

_EXPIRE_INTERVAL_S = 5.0


class InferencePlugin(NodePlugin):
    """The stage servicer of one node and the thread that expires its idle sessions."""

    def __init__(self, host: NodeHost) -> None:
        self.host = host
        self.servicer = InferenceStageServicer(
            node_id=host.node_id,
            device=host.device,
            state_dir=host.state_dir,
            open_coordinator_shard=self._open_coordinator_shard,
            on_change=lambda m: host.update_metrics(**m),
            confirm=self._confirm,
            traffic=host.traffic,
            security=host.security,
            identify=host.security.peer_identity,
            confirm_fetch=self._confirm_fetch,
            faults=host.faults,
            sign=host.sign,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.wire: WireServer | None = None

    def _open_coordinator_shard(self, req):
        stub = pb_grpc.InferenceGatewayStub(self.host.coordinator_channel)
        return stub.FetchShard(req, metadata=self.host.call_metadata(), timeout=600)

    def _confirm(self, assignment) -> tuple[str, bytes] | None:
        """(the chain's step capability, this stage's commit key) if the coordinator issued this
        assignment, else None."""
        stub = pb_grpc.InferenceGatewayStub(self.host.coordinator_channel)
        try:
            reply = stub.ConfirmAssignment(pb.ServeConfirmRequest(assignment=assignment),
                                           metadata=self.host.call_metadata(), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "coordinator") from exc
        return (reply.step_capability, bytes(reply.commit_key)) if reply.confirmed and reply.step_capability else None

    def _confirm_fetch(self, node_id: str, model_name: str) -> bool:
        """Whether the coordinator placed ``node_id`` on ``model_name`` (it may fetch our shard)."""
        stub = pb_grpc.InferenceGatewayStub(self.host.coordinator_channel)
        try:
            reply = stub.ConfirmShardFetch(pb.ServeConfirmFetchRequest(model_name=model_name, node_id=node_id),
                                           metadata=self.host.call_metadata(), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, "coordinator") from exc
        return reply.allowed

    def install(self, server) -> None:
        pb_grpc.add_InferenceStageServicer_to_server(self.servicer, server)

    def _expire_loop(self) -> None:
        while not self._stop.wait(_EXPIRE_INTERVAL_S):
            try:
                self.servicer.expire_sessions()
                self.servicer._changed()  # sessions, steps, step-wire counters: sent with the next heartbeat
            except Exception:  # noqa: BLE001 -- the loop must survive
                log.exception("session expiry failed")

    def start(self) -> None:
        if self.host.step_wire_port >= 0 and hasattr(self.host.security, "ssl_context"):
            try:
                self.wire = WireServer(security=self.host.security, host=self.host.listen_host,
                                       port=self.host.step_wire_port,
                                       serve_stream=self.servicer.StepStream, spin_s=self.servicer.spin_s).start()
                self.servicer.wire = self.wire
                log.info("step wire listening on port %d", self.wire.port)
            except OSError as exc:
                log.warning("no step wire (cannot listen on port %d: %s); generation steps go over gRPC; "
                            "pick a free --step-wire-port", self.host.step_wire_port, exc)
        t = threading.Thread(target=self._expire_loop, name="inference-expire", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        if self.wire is not None:
            self.wire.stop()
        for t in self._threads:
            t.join(timeout=5)
        self.servicer.close_all()


def create(host: NodeHost) -> InferencePlugin:
    return InferencePlugin(host)
