"""The node's calls to the coordinator's Training service (with the node's session metadata)."""

from __future__ import annotations

import logging
from pathlib import Path

from swarm.proto.v1 import training_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc as pb_grpc
from swarm.transport import transfer, transfer_pb
from swarm.transport.errors import translate_rpc_errors

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 16 << 30


class TrainingClient:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.stub = pb_grpc.TrainingStub(agent.coordinator_channel)

    def _md(self):
        return self.agent.call_metadata()

    def poll(self, timeout_s: float = 10.0) -> pb.PollAssignmentsReply:
        with translate_rpc_errors("coordinator"):
            return self.stub.PollAssignments(pb.PollAssignmentsRequest(), metadata=self._md(), timeout=timeout_s)

    def report(self, report: pb.ProgressReport, timeout_s: float = 10.0) -> pb.ProgressAck:
        with translate_rpc_errors("coordinator"):
            return self.stub.ReportProgress(report, metadata=self._md(), timeout=timeout_s)

    def rendezvous(self, req: pb.RendezvousRequest, timeout_s: float = 10.0) -> pb.RendezvousReply:
        with translate_rpc_errors("coordinator"):
            return self.stub.Rendezvous(req, metadata=self._md(), timeout=timeout_s)

    def fetch_data(self, job_id: str, timeout_s: float = 600.0) -> bytes:
        with translate_rpc_errors("coordinator"):
            return _collect(self.stub.FetchJobData(pb.FetchJobDataRequest(job_id=job_id), metadata=self._md(),
                                                   timeout=timeout_s))

    def fetch_weights(self, job_id: str, stage: int, timeout_s: float = 600.0) -> bytes:
        with translate_rpc_errors("coordinator"):
            return _collect(self.stub.FetchStageWeights(pb.FetchStageWeightsRequest(job_id=job_id, stage=stage),
                                                        metadata=self._md(), timeout=timeout_s))

    def fetch_optimizer_state(self, job_id: str, stage: int, timeout_s: float = 600.0) -> bytes:
        """The stage's AdamW state at the assignment's resume step. Raises NotFoundError when the
        checkpoint has none."""
        with translate_rpc_errors("coordinator"):
            req = pb.FetchStageWeightsRequest(job_id=job_id, stage=stage, optimizer_state=True)
            return _collect(self.stub.FetchStageWeights(req, metadata=self._md(), timeout=timeout_s))

    def upload_checkpoint(self, header: pb.CheckpointHeader, files: list[Path], timeout_s: float = 600.0) -> None:
        def chunks():
            yield pb.CheckpointChunk(header=header)
            yield from transfer_pb.to_messages(transfer.send_files((f"ckpt/{f.name}", f) for f in files),
                                               pb.CheckpointChunk)

        with translate_rpc_errors("coordinator"):
            self.stub.UploadCheckpoint(chunks(), metadata=self._md(), timeout=timeout_s)


def _collect(stream) -> bytes:
    """One file from a FileChunk stream, size- and SHA-256-checked."""
    return transfer.receive_bytes(transfer_pb.from_messages(stream), max_bytes=MAX_DOWNLOAD_BYTES)[1]
