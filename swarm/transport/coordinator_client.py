"""The one client of the coordinator for users: the CLI, benchmarks and tests.

:class:`CoordinatorClient` holds one channel to the coordinator's gRPC port and calls its three
user-facing services (Coordinator: nodes and links; Training: jobs; InferenceGateway: models and
generation). Every call maps gRPC failures to swarm errors with
:func:`~swarm.transport.errors.translate_rpc_errors`, carries the coordinator's token (when one
was given) in ``swarm-api-token`` metadata, and returns frozen domain records, never protobuf.
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

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm import certs
from swarm.errors import AuthError, InvalidRequestError
from swarm.membership import Link, NodeInfo
from swarm.proto.v1 import coordinator_pb2 as cpb
from swarm.proto.v1 import coordinator_pb2_grpc as cpb_grpc
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.proto.v1 import inference_pb2_grpc as ipb_grpc
from swarm.proto.v1 import training_pb2 as tpb
from swarm.proto.v1 import training_pb2_grpc as tpb_grpc
from swarm.transport import transfer, transfer_pb
from swarm.transport.auth import api_token_metadata
from swarm.transport.channels import control_channel, parse_address
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


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True, kw_only=True)
class SwarmSnapshot:
    nodes: tuple[NodeInfo, ...]
    links: tuple[Link, ...]
    server_time_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadFile:
    """A local file and the name it gets in the job (``data/...`` or ``checkpoint/...``)."""

    path: Path
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """A training job as the coordinator reports it. ``detail`` is the JSON object of
    ``GET /api/jobs/{id}`` (step, loss, spec, plan, progress...), what ``swarm job --json`` prints."""

    id: str
    state: str
    reason: str
    detail: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRecord:
    node_id: str
    address: str
    first_layer: int
    last_layer_excl: int
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaRecord:
    replica: int
    state: str
    predicted_latency_s: float
    stages: tuple[StageRecord, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRecord:
    """A per-request route in use: each stage's replica (and node), its sessions, and the
    coordinator's predicted time per token on it."""

    replicas: tuple[int, ...]
    node_ids: tuple[str, ...]
    sessions: int
    predicted_s_per_token: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggRecord:
    """Disaggregated prefill and decode of a model: whether it is on, the nodes of each side, the
    coordinator's prediction against colocated serving (``predicted_gain``: throughput ratio) and why,
    and the KV cache bytes moved so far."""

    enabled: bool = False
    requested: bool = False
    mode: str = ""  # the served --disaggregate mode: auto, on, off ("" from a coordinator older than modes)
    prefill_nodes: tuple[str, ...] = ()
    decode_nodes: tuple[str, ...] = ()
    predicted_gain: float = 0.0
    predicted_tbt_p99_ratio: float = 0.0
    reason: str = ""
    kv_bytes_moved: int = 0
    num_handoffs: int = 0
    num_handoff_failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "enabled": self.enabled, "requested": self.requested, "prefill_nodes": list(self.prefill_nodes),
                "decode_nodes": list(self.decode_nodes), "predicted_gain": self.predicted_gain,
                "predicted_tbt_p99_ratio": self.predicted_tbt_p99_ratio, "reason": self.reason,
                "kv_bytes_moved": self.kv_bytes_moved, "num_handoffs": self.num_handoffs,
                "num_handoff_failures": self.num_handoff_failures}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    """A served model and where its layers are. :meth:`to_json` is what ``swarm models --json`` prints."""

    name: str
    family: str
    num_layers: int
    digest: str
    state: str
    size_bytes: int
    max_seq_len: int
    created_at_s: float
    error: str
    replicas: tuple[ReplicaRecord, ...]
    healthy_replicas: int = 0  # ready replicas whose nodes are all online
    requested_replicas: int = 0  # the count the coordinator heals back to
    healing: str = ""  # why it is below that count, while the coordinator waits for a spare node
    verify_prob: float = 0.0  # fraction of session steps spot-checked (0: off)
    num_checks: int = 0  # spot checks done since the model was placed
    num_check_failures: int = 0  # of them, the chains disagreed
    num_checks_void: int = 0  # sampled steps released unchecked (no other chain nor the referee could replay them)
    num_referee_checks: int = 0  # of num_checks, steps whose window the coordinator's referee replayed
    num_referee_void: int = 0  # windows void because the referee was over its budget
    routes_enabled: bool = False  # sessions take per-request routes (swarm serve --routes)
    routes: tuple[RouteRecord, ...] = ()  # routes in use, with their sessions
    disaggregation: DisaggRecord | None = None  # prefill/decode split, prediction and KV moved
    probation: tuple[str, ...] = ()  # node ids of its chains on probation (every window they serve is checked)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "family": self.family, "num_layers": self.num_layers, "digest": self.digest,
            "state": self.state, "size_bytes": self.size_bytes, "max_seq_len": self.max_seq_len,
            "created_at": self.created_at_s, "error": self.error,
            "replica_count": {"healthy": self.healthy_replicas, "requested": self.requested_replicas},
            "healing": self.healing,
            "verification": {"verify_prob": self.verify_prob, "checks": self.num_checks,
                             "failed": self.num_check_failures, "void": self.num_checks_void,
                             "referee_checks": self.num_referee_checks, "referee_void": self.num_referee_void,
                             "probation": list(self.probation)},
            "replicas": [
                {"replica": r.replica, "state": r.state, "predicted_latency_s": r.predicted_latency_s,
                 "probation": [s.node_id for s in r.stages if s.node_id and s.node_id in self.probation],
                 "stages": [{"node_id": s.node_id, "address": s.address, "first_layer": s.first_layer,
                             "last_layer_excl": s.last_layer_excl, "state": s.state} for s in r.stages]}
                for r in self.replicas
            ],
            "routes_enabled": self.routes_enabled,
            "routes": [{"replicas": list(r.replicas), "node_ids": list(r.node_ids), "sessions": r.sessions,
                        "predicted_s_per_token": r.predicted_s_per_token} for r in self.routes],
            "disaggregation": (self.disaggregation or DisaggRecord()).to_json(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateEvent:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_replays: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeOptions:
    """How to serve an uploaded model (the `swarm serve` flags); 0 or "" lets the coordinator decide."""

    num_replicas: int = 1
    num_stages: int = 0
    max_seq_len: int = 0
    sessions_per_replica: int = 0
    objective: str = ""
    hidden_codec: str = ""
    dtype: str = ""
    verify_prob: float | None = None  # fraction of steps spot-checked; None: the coordinator's default
    routes: bool = False  # per-request routes over the replicas' stages (no spot checks)
    # prefill and decode on separate chains: "on" (no spot checks, no routes), "off", "auto" (when the
    # options allow it and the placement predicts a gain); "": the coordinator's default (auto)
    disaggregate: str = ""

    def __post_init__(self) -> None:
        if self.disaggregate not in ("", "auto", "on", "off"):
            raise InvalidRequestError(f"disaggregate must be auto, on or off (or empty), got {self.disaggregate!r}")


# ----------------------------------------------------------------------------- proto -> records
def _job_record(r: tpb.JobRecord) -> JobRecord:
    try:
        detail = json.loads(r.detail_json)
    except json.JSONDecodeError:
        detail = {"id": r.job_id, "state": r.state, "reason": r.reason}
    return JobRecord(id=r.job_id or detail.get("id", ""), state=r.state or detail.get("state", ""),
                     reason=r.reason, detail=detail)


def model_record(m: ipb.ServeModelInfo) -> ModelRecord:
    """The domain record of a ServeModelInfo (what ``swarm models`` and ``/api/models`` show)."""
    return ModelRecord(
        name=m.name, family=m.family, num_layers=m.num_layers, digest=m.digest, state=m.state,
        size_bytes=m.size_bytes, max_seq_len=m.max_seq_len, created_at_s=m.created_at_s, error=m.error,
        healthy_replicas=m.healthy_replicas, requested_replicas=m.requested_replicas, healing=m.healing,
        verify_prob=m.verify_prob, num_checks=m.num_checks, num_check_failures=m.num_check_failures,
        num_checks_void=m.num_checks_void, num_referee_checks=m.num_referee_checks,
        num_referee_void=m.num_referee_void, routes_enabled=m.routes_enabled, probation=tuple(m.probation_node_ids),
        routes=tuple(RouteRecord(replicas=tuple(r.replicas), node_ids=tuple(r.node_ids), sessions=r.sessions,
                                 predicted_s_per_token=r.predicted_s_per_token) for r in m.routes),
        disaggregation=DisaggRecord(
            enabled=m.disaggregation.enabled, requested=m.disaggregation.requested, mode=m.disaggregation.mode,
            prefill_nodes=tuple(m.disaggregation.prefill_nodes), decode_nodes=tuple(m.disaggregation.decode_nodes),
            predicted_gain=m.disaggregation.predicted_gain,
            predicted_tbt_p99_ratio=m.disaggregation.predicted_tbt_p99_ratio, reason=m.disaggregation.reason,
            kv_bytes_moved=m.disaggregation.kv_bytes_moved, num_handoffs=m.disaggregation.num_handoffs,
            num_handoff_failures=m.disaggregation.num_handoff_failures),
        replicas=tuple(
            ReplicaRecord(replica=r.replica, state=r.state, predicted_latency_s=r.predicted_latency_s,
                          stages=tuple(StageRecord(node_id=s.node_id, address=s.address, first_layer=s.first_layer,
                                                   last_layer_excl=s.last_layer_excl, state=s.state)
                                       for s in r.stages))
            for r in m.replicas
        ),
    )


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
            return _job_record(self._training.SubmitJob(chunks(), timeout=timeout_s, metadata=self._md))

    def resume_job(self, job_id: str, spec: "JobSpec") -> JobRecord:
        """Start a new job from ended job ``job_id``'s last complete checkpoint (weights, optimizer
        state, data position) with ``spec``; needs the admin token."""
        from swarm.transport.jobs import job_spec_to_pb

        with translate_rpc_errors(self._what):
            return _job_record(self._training.ResumeJob(tpb.ResumeJobRequest(job_id=job_id, spec=job_spec_to_pb(spec)),
                                                        timeout=self.timeout_s, metadata=self._md))

    def get_job(self, job_id: str) -> JobRecord:
        with translate_rpc_errors(self._what):
            return _job_record(self._training.GetJob(tpb.GetJobRequest(job_id=job_id), timeout=self.timeout_s,
                                                     metadata=self._md))

    def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        with translate_rpc_errors(self._what):
            reply = self._training.ListJobs(tpb.ListJobsRequest(limit=limit), timeout=self.timeout_s,
                                            metadata=self._md)
        return [_job_record(r) for r in reply.jobs]

    def cancel_job(self, job_id: str, reason: str = "") -> JobRecord:
        """Cancel a job; needs the admin token."""
        with translate_rpc_errors(self._what):
            return _job_record(self._training.CancelJob(tpb.CancelJobRequest(job_id=job_id, reason=reason),
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
