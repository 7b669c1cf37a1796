"""The node's calls to the coordinator's Training service (with the node's session metadata)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from swarm.errors import InvalidRequestError
from swarm.proto.v1 import training_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc as pb_grpc
from swarm.transport.channels import CHUNK_BYTES
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

    def upload_checkpoint(self, header: pb.CheckpointHeader, files: list[Path], timeout_s: float = 600.0) -> None:
        def chunks():
            yield pb.CheckpointChunk(header=header)
            for f in files:
                data = f.read_bytes()
                yield pb.CheckpointChunk(file=pb.FileHeader(name=f"ckpt/{f.name}", size_bytes=len(data),
                                                            sha256=hashlib.sha256(data).hexdigest()))
                for start in range(0, len(data), CHUNK_BYTES):
                    yield pb.CheckpointChunk(data=data[start:start + CHUNK_BYTES])

        with translate_rpc_errors("coordinator"):
            self.stub.UploadCheckpoint(chunks(), metadata=self._md(), timeout=timeout_s)


def _collect(stream) -> bytes:
    """One file from a FileChunk stream, size- and SHA-256-checked."""
    header = None
    buf = bytearray()
    for chunk in stream:
        if chunk.HasField("file"):
            if header is not None:
                raise InvalidRequestError("expected one file in the stream")
            header = chunk.file
            if not 0 <= header.size_bytes <= MAX_DOWNLOAD_BYTES:
                raise InvalidRequestError(f"file of {header.size_bytes} bytes is over the limit")
        if chunk.data:
            if header is None or len(buf) + len(chunk.data) > header.size_bytes:
                raise InvalidRequestError("file data without a header or past its announced size")
            buf += chunk.data
    if header is None or len(buf) != header.size_bytes:
        raise InvalidRequestError("file stream ended early")
    if hashlib.sha256(buf).hexdigest() != header.sha256:
        raise InvalidRequestError("downloaded file failed its SHA-256 check")
    return bytes(buf)
