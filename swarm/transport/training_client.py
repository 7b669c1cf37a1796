"""Client of the coordinator's Training service for users (``swarm train``, ``swarm jobs``...).

Submission streams the job spec, then each file (data texts, starting checkpoint) as a header
with size and SHA-256 followed by 1 MiB chunks. Job records come back as plain dicts (the JSON
of ``GET /api/jobs/{id}``), never as protobuf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.errors import InvalidRequestError
from swarm.job_spec import JobSpec
from swarm.proto.v1 import training_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc as pb_grpc
from swarm.transport.auth import API_TOKEN_KEY
from swarm.transport.channels import CHUNK_BYTES, control_channel, parse_address
from swarm.transport.errors import translate_rpc_errors
from swarm.transport.jobs import job_spec_to_pb

MAX_RESULT_BYTES = 64 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadFile:
    """A local file and the name it gets in the job (``data/...`` or ``checkpoint/...``)."""

    path: Path
    name: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _submit_chunks(spec: JobSpec, files: list[UploadFile], on_bytes=None) -> Iterator[pb.SubmitJobChunk]:
    yield pb.SubmitJobChunk(spec=job_spec_to_pb(spec))
    for f in files:
        size = f.path.stat().st_size
        yield pb.SubmitJobChunk(file=pb.FileHeader(name=f.name, size_bytes=size, sha256=_sha256(f.path)))
        with f.path.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                if on_bytes is not None:
                    on_bytes(len(block))
                yield pb.SubmitJobChunk(data=block)


def _record(r: pb.JobRecord) -> dict[str, Any]:
    try:
        return json.loads(r.detail_json)
    except json.JSONDecodeError:
        return {"id": r.job_id, "state": r.state, "reason": r.reason}


class TrainingClient:
    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 30.0) -> None:
        parse_address(address)
        self.address = address
        self._md = ((API_TOKEN_KEY, token),) if token else ()
        self.timeout_s = timeout_s
        self._channel = control_channel(address)
        self._stub = pb_grpc.TrainingStub(self._channel)
        self._what = f"coordinator at {address}"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "TrainingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, spec: JobSpec, files: list[UploadFile], *, timeout_s: float = 3600.0,
               on_bytes=None) -> dict[str, Any]:
        with translate_rpc_errors(self._what):
            return _record(self._stub.SubmitJob(_submit_chunks(spec, files, on_bytes), timeout=timeout_s,
                                                metadata=self._md))

    def get(self, job_id: str) -> dict[str, Any]:
        with translate_rpc_errors(self._what):
            return _record(self._stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout_s))

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        with translate_rpc_errors(self._what):
            reply = self._stub.ListJobs(pb.ListJobsRequest(limit=limit), timeout=self.timeout_s)
        return [_record(r) for r in reply.jobs]

    def cancel(self, job_id: str, reason: str = "") -> dict[str, Any]:
        with translate_rpc_errors(self._what):
            return _record(self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self.timeout_s,
                                                metadata=self._md))

    def download_result(self, job_id: str, out_dir: Path, *, timeout_s: float = 3600.0) -> list[Path]:
        """Write the job's exported checkpoint files into ``out_dir`` (sizes and SHA-256 checked)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        cur = None
        total = 0
        with translate_rpc_errors(self._what):
            for chunk in self._stub.DownloadResult(pb.DownloadResultRequest(job_id=job_id), timeout=timeout_s):
                if chunk.HasField("file"):
                    if cur is not None:
                        _close(cur)
                    name = chunk.file.name
                    if "/" in name or "\\" in name or name in ("", ".", ".."):
                        raise InvalidRequestError(f"the coordinator sent a bad file name {name!r}")
                    path = out_dir / name
                    cur = (path, path.open("wb"), hashlib.sha256(), chunk.file.size_bytes, chunk.file.sha256, [0])
                    written.append(path)
                if chunk.data:
                    if cur is None:
                        raise InvalidRequestError("result data arrived before a file header")
                    total += len(chunk.data)
                    if total > MAX_RESULT_BYTES or cur[5][0] + len(chunk.data) > cur[3]:
                        raise InvalidRequestError("result larger than announced")
                    cur[1].write(chunk.data)
                    cur[2].update(chunk.data)
                    cur[5][0] += len(chunk.data)
        if cur is not None:
            _close(cur)
        return written


def _close(cur) -> None:
    path, fh, h, size, sha, n = cur
    fh.close()
    if n[0] != size or h.hexdigest() != sha:
        raise InvalidRequestError(f"downloaded {path.name} is corrupt (size or SHA-256 mismatch); download again")
