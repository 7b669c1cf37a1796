"""The coordinator's calls to the stages of one chain other than its steps.

A chain (coordinator/inference/replica.py) keeps one TLS channel to each of its stages, whose
certificate must name the stage's node. Every call carries the chain's step capability as
metadata (node/inference/servicer.py checks it), so the stages take them from the coordinator
that placed them only. Besides the steps (on their persistent link), the coordinator:

- asks a stage whether it is alive (:meth:`StageCalls.probe`: a CloseSession of nothing; a stage
  reloaded for another chain refuses the capability, which still proves it alive);
- closes sessions directly when the chain went idle (:meth:`close_sessions`; an unreachable stage
  frees them by its timeout);
- unloads the stages when the chain is stopped (:meth:`unload`);
- asks a prefill stage to push a session's KV to a decode chain (:meth:`push_kv`, disaggregated
  serving: coordinator/inference/disagg.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from coordinator.inference.sessions import StageRef
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.inference import step_metadata


class StageCalls:
    """Channels and stubs to one chain's stages, and the calls above; ``capability`` is the
    chain's step capability (:meth:`use_capability` replaces it)."""

    def __init__(self, *, model: str, index: int, stages: Sequence[StageRef], security, capability: str) -> None:
        self.model = model
        self.index = index
        self.stages = list(stages)
        self.metadata = step_metadata(capability)
        # TLS as the coordinator (swarm://coordinator); each stage's certificate must name its node
        self.channels = [data_channel(s.address, security=security, node_id=s.node_id) for s in stages]
        self.stubs = [pb_grpc.InferenceStageStub(c) for c in self.channels]

    def use_capability(self, capability: str) -> None:
        self.metadata = step_metadata(capability)

    def probe(self, timeout_s: float = 2.0, retry_timeout_s: float = 6.0) -> list[str]:
        """Node ids of stages that do not answer a trivial call (dead or unreachable). A stage
        silent for ``timeout_s`` is asked once more for ``retry_timeout_s``: on a loaded host a
        live node's answer (a fresh TLS connection among them) can take over 2 s, and a survivor
        taken for dead is suspected and its chain re-placed instead of relinked; a killed node's
        port refuses at once, so the second ask costs nothing there."""
        silent = [(stub, st) for stub, st in zip(self.stubs, self.stages) if not self._answers(stub, timeout_s)]
        return [st.node_id for stub, st in silent if not self._answers(stub, retry_timeout_s)]

    def _answers(self, stub, timeout_s: float) -> bool:
        try:
            stub.CloseSession(pb.ServeCloseSessionRequest(model_name=self.model, replica=self.index), timeout=timeout_s,
                              metadata=self.metadata)
        except grpc.RpcError as exc:
            # a stage reloaded for another chain refuses our capability: it answered, so it is alive
            return exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        return True

    def close_sessions(self, ids: list[str]) -> None:
        """Free ``ids`` on every stage (best effort: an unreachable stage frees them by timeout)."""
        for stub in self.stubs:
            try:
                stub.CloseSession(pb.ServeCloseSessionRequest(model_name=self.model, replica=self.index,
                                                              session_ids=ids), timeout=5, metadata=self.metadata)
            except grpc.RpcError:
                pass

    def unload(self) -> None:
        """Unload every stage of the chain (best effort, 3 s each)."""
        for stub in self.stubs:
            try:
                stub.UnloadStage(pb.ServeUnloadStageRequest(model_name=self.model, replica=self.index), timeout=3,
                                 metadata=self.metadata)
            except grpc.RpcError:
                pass

    def push_kv(self, stage: int, request: pb.ServePushKVRequest, *, timeout_s: float) -> pb.ServePushKVReply:
        """Ask ``stage`` to push a session's KV cache (raises grpc.RpcError as the call does)."""
        return self.stubs[stage].PushKV(request, timeout=timeout_s, metadata=self.metadata)

    def close(self) -> None:
        for c in self.channels:
            c.close()
