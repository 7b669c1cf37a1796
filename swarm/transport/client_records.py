"""What :class:`swarm.transport.coordinator_client.CoordinatorClient` returns: frozen domain
records of the coordinator's replies (nodes and links, jobs, served models, generated tokens) and
the serving options it sends, with the functions that build the records from protobuf.

Like the client, this module imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm.errors import InvalidRequestError
from swarm.membership import Link, NodeInfo
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.proto.v1 import training_pb2 as tpb


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
def job_record(r: tpb.JobRecord) -> JobRecord:
    """The domain record of a JobRecord reply (its ``detail_json`` parsed; unreadable: the basics)."""
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
