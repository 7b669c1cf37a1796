"""The one client of the coordinator for users: the CLI, benchmarks and tests.

:class:`CoordinatorClient` holds one channel to the coordinator's gRPC port and calls its three
user-facing services (Coordinator: nodes and links; Training: jobs; InferenceGateway: models and
generation). Every call maps gRPC failures to swarm errors with
:func:`~swarm.transport.errors.translate_rpc_errors`, carries the coordinator's token (when one
was given) in ``swarm-api-token`` metadata, and returns frozen domain records, never protobuf
(swarm/transport/client_records.py).
Files go through :mod:`swarm.transport.transfer` (sizes and SHA-256 checked on both sides).

The channel is TLS: the client trusts the coordinator only once its CA matches the fingerprint
in the token (``swarm1.<fingerprint>.<secret>``: every token of a coordinator pins its CA). What
the token allows is the coordinator's decision: the admin token changes what the swarm runs, the
read token (or the admin token) reads; ``swarm1.<fingerprint>`` alone only verifies (and reads on
a ``--public-status`` coordinator). The CA is fetched on the first call.

The node's own calls (register, heartbeat, training assignments) use its session secret and
live in ``node.coordinator_link`` / ``node.training.client`` on the same channel helpers.

This module imports no torch, so that `swarm status`, `swarm jobs` etc. start fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from swarm import certs
from swarm.errors import AuthError, InvalidRequestError
from swarm.proto.v1 import coordinator_pb2 as cpb
from swarm.proto.v1 import coordinator_pb2_grpc as cpb_grpc
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.proto.v1 import inference_pb2_grpc as ipb_grpc
from swarm.proto.v1 import training_pb2 as tpb
from swarm.proto.v1 import training_pb2_grpc as tpb_grpc
from swarm.transport import transfer, transfer_pb
from swarm.transport.auth import api_token_metadata
from swarm.transport.channels import control_channel, parse_address
from swarm.transport.client_records import (GenerateEvent, JobRecord, ModelRecord, ServeOptions, SwarmSnapshot,
                                            UploadFile, job_record, model_record)
from swarm.transport.convert import link_from_proto, node_from_proto, sampling_to_pb
from swarm.transport.errors import translate_rpc_errors
from swarm.transport.lazy_channels import DeferredChannel
from swarm.transport.tls import TlsSecurity, fetch_ca

if TYPE_CHECKING:
    from swarm.inference.params import SamplingParams
    from swarm.job_spec import JobSpec

MAX_RESULT_BYTES = 64 << 30
# What `swarm serve` uploads from a checkpoint directory, and how many files at most.
UPLOAD_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
MAX_UPLOAD_FILES = 256


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The files of a checkpoint directory that `swarm serve` uploads. Raises InvalidRequestError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InvalidRequestError(f"{model_dir} is not a directory; point --model at an HF-format checkpoint")
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in UPLOAD_SUFFIXES)
    if not (model_dir / "config.json").is_file() or not any(p.suffix == ".safetensors" for p in files):
        raise InvalidRequestError(f"{model_dir} needs config.json and *.safetensors")
    return files


# ----------------------------------------------------------------------------- client
class CoordinatorClient:
    """User calls to the coordinator at ``address`` (``host:port`` of its gRPC port).

    ``token``: a token of the coordinator (``swarm1.<CA fingerprint>.<secret>``): its fingerprint
    verifies the coordinator; the admin token changes what the swarm runs (submit/cancel a job,
    serve/unserve a model), the read token reads (nodes, jobs, models, generation); sent in
    ``swarm-api-token`` metadata, inside TLS.
    ``ca_fingerprint``: the CA to trust when ``token`` does not carry one (64 hex);
    ``ca_pem``: an already verified CA certificate (tests, the local swarm). ``timeout_s``: per short call.
    Methods raise swarm errors: UnavailableError (unreachable), AuthError (token), NotFoundError,
    InvalidRequestError, CapacityError. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 30.0,
                 ca_fingerprint: str | None = None, ca_pem: bytes | None = None) -> None:
        parse_address(address)
        self.address = address
        self.timeout_s = timeout_s
        fingerprint = ca_fingerprint
        if token and certs.is_token(token):
            parsed = certs.parse_token(token)
            fingerprint = parsed.fingerprint
            token = token if parsed.secret else None
        self._md = api_token_metadata(token)
        self._token = token
        self._fingerprint = fingerprint
        self._ca_pem = ca_pem
        self._channel = DeferredChannel(self._connect)
        self._coordinator = cpb_grpc.CoordinatorStub(self._channel)
        self._training = tpb_grpc.TrainingStub(self._channel)
        self._gateway = ipb_grpc.InferenceGatewayStub(self._channel)
        self._what = f"coordinator at {address}"

    def _connect(self):
        ca = self._ca_pem
        if ca is None:
            if not self._fingerprint and self._token:
                certs.parse_token(self._token)  # an old-format token: AuthError saying what to paste
            if not self._fingerprint:
                # AuthError as before TLS, and the same words as the coordinator's for a change
                # without a token; distinct from a wrong token's ("the token given is wrong").
                raise AuthError("connecting to a coordinator needs its token, and no token was given: pass --token "
                                "or set SWARM_TOKEN (as swarm-coordinator serve printed it: admin_token= for "
                                "changes, read_token= to read)")
            try:
                ca = fetch_ca(self.address, self._fingerprint, timeout_s=min(self.timeout_s, 10.0))
            except AuthError as exc:
                raise AuthError(f"coordinator at {self.address}: {exc}") from exc
        return control_channel(self.address, security=TlsSecurity(ca_pem=ca))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    # -- nodes and links --------------------------------------------------------------------------
    def snapshot(self, *, timeout_s: float | None = None) -> SwarmSnapshot:
        """The nodes and measured links the coordinator knows."""
        t = self._timeout(timeout_s)
        with translate_rpc_errors(self._what):
            nodes = self._coordinator.ListNodes(cpb.ListNodesRequest(), timeout=t, metadata=self._md)
            network = self._coordinator.GetNetwork(cpb.GetNetworkRequest(), timeout=t, metadata=self._md)
        return SwarmSnapshot(
            nodes=tuple(node_from_proto(n) for n in nodes.nodes),
            links=tuple(link_from_proto(link) for link in network.links),
            server_time_s=nodes.server_time_s,
        )

    # -- training jobs ----------------------------------------------------------------------------
    def submit_job(self, spec: "JobSpec", files: list[UploadFile], *, timeout_s: float = 3600.0,
                   on_bytes: Callable[[int], None] | None = None) -> JobRecord:
        """Upload the job's files (``data/...``, ``checkpoint/...``) with its spec; needs the admin token."""
        from swarm.transport.jobs import job_spec_to_pb  # imports torch (CodecSpec): only when submitting

        spec_pb = job_spec_to_pb(spec)

        def chunks() -> Iterator[tpb.SubmitJobChunk]:
            yield tpb.SubmitJobChunk(spec=spec_pb)
            items = transfer.send_files(((f.name, f.path) for f in files), on_bytes=on_bytes)
            yield from transfer_pb.to_messages(items, tpb.SubmitJobChunk)

        with translate_rpc_errors(self._what):
            return job_record(self._training.SubmitJob(chunks(), timeout=timeout_s, metadata=self._md))

    def resume_job(self, job_id: str, spec: "JobSpec") -> JobRecord:
        """Start a new job from ended job ``job_id``'s last complete checkpoint (weights, optimizer
        state, data position) with ``spec``; needs the admin token."""
        from swarm.transport.jobs import job_spec_to_pb

        with translate_rpc_errors(self._what):
            return job_record(self._training.ResumeJob(tpb.ResumeJobRequest(job_id=job_id, spec=job_spec_to_pb(spec)),
                                                        timeout=self.timeout_s, metadata=self._md))

    def get_job(self, job_id: str) -> JobRecord:
        with translate_rpc_errors(self._what):
            return job_record(self._training.GetJob(tpb.GetJobRequest(job_id=job_id), timeout=self.timeout_s,
                                                     metadata=self._md))

    def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        with translate_rpc_errors(self._what):
            reply = self._training.ListJobs(tpb.ListJobsRequest(limit=limit), timeout=self.timeout_s,
                                            metadata=self._md)
        return [job_record(r) for r in reply.jobs]

    def cancel_job(self, job_id: str, reason: str = "") -> JobRecord:
        """Cancel a job; needs the admin token."""
        with translate_rpc_errors(self._what):
            return job_record(self._training.CancelJob(tpb.CancelJobRequest(job_id=job_id, reason=reason),
                                                        timeout=self.timeout_s, metadata=self._md))

    def download_result(self, job_id: str, out_dir: Path, *, timeout_s: float = 3600.0) -> list[Path]:
        """Write the job's exported checkpoint files into ``out_dir`` (sizes and SHA-256 checked;
        a file appears only once it is complete): the final model of a succeeded job, else its
        last complete checkpoint."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        limits = transfer.TransferLimits(max_file_bytes=MAX_RESULT_BYTES, max_total_bytes=MAX_RESULT_BYTES)
        with translate_rpc_errors(self._what):
            stream = self._training.DownloadResult(tpb.DownloadResultRequest(job_id=job_id), timeout=timeout_s,
                                                   metadata=self._md)
            names = transfer.receive_files(transfer_pb.from_messages(stream), out_dir, limits=limits)
        return [out_dir / n for n in names]

    # -- inference ----------------------------------------------------------------------------------
    def upload_model(self, model_dir: str | Path, *, name: str, options: ServeOptions = ServeOptions(),
                     timeout_s: float = 600.0, on_bytes: Callable[[int], None] | None = None) -> ModelRecord:
        """Stream a checkpoint directory to the coordinator and wait until it is placed and loaded;
        needs the admin token."""
        files = checkpoint_files(Path(model_dir))
        headers = [transfer.file_header(p.name, p) for p in files]
        header = ipb.ServeUploadHeader(
            name=name, files=[transfer_pb.upload_file_to_pb(h) for h in headers],
            num_replicas=options.num_replicas, num_stages=options.num_stages, max_seq_len=options.max_seq_len,
            sessions_per_replica=options.sessions_per_replica, objective=options.objective,
            hidden_codec=options.hidden_codec, dtype=options.dtype, verify_prob=options.verify_prob,
            routes=options.routes, disaggregate=options.disaggregate == "on",  # the bool: for older coordinators
            disaggregate_mode=options.disaggregate,
        )

        def chunks() -> Iterator[ipb.ServeUploadChunk]:
            yield ipb.ServeUploadChunk(header=header)
            for p in files:
                for block in transfer.iter_file(p, on_bytes=on_bytes):
                    yield ipb.ServeUploadChunk(path=p.name, data=block)

        with translate_rpc_errors(self._what):
            reply = self._gateway.UploadModel(chunks(), timeout=timeout_s, metadata=self._md)
        return model_record(reply.model)

    def list_models(self) -> list[ModelRecord]:
        with translate_rpc_errors(self._what):
            reply = self._gateway.ListModels(ipb.ServeListModelsRequest(), timeout=self.timeout_s, metadata=self._md)
        return [model_record(m) for m in reply.models]

    def unserve_model(self, name: str) -> bool:
        """Stop serving ``name``; needs the admin token. False if it was not served."""
        with translate_rpc_errors(self._what):
            reply = self._gateway.Unserve(ipb.ServeUnserveRequest(name=name), timeout=self.timeout_s,
                                          metadata=self._md)
        return reply.removed

    def generate(self, *, model: str, params: SamplingParams, prompt: str = "",
                 prompt_token_ids: list[int] | None = None, timeout_s: float = 600.0) -> Iterator[GenerateEvent]:
        """Stream a generation from the gateway: one event per batch of new tokens."""
        req = ipb.ServeGenerateRequest(
            model=model, prompt=prompt, prompt_token_ids=list(prompt_token_ids or []),
            max_new_tokens=params.max_new_tokens, sampling=sampling_to_pb(params), stop=list(params.stop),
        )
        with translate_rpc_errors(self._what):
            for ev in self._gateway.Generate(req, timeout=timeout_s, metadata=self._md):
                yield GenerateEvent(token_ids=tuple(ev.token_ids), text=ev.text, finish_reason=ev.finish_reason,
                                    num_prompt_tokens=ev.num_prompt_tokens, num_replays=ev.num_replays)
