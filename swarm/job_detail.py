"""The JSON record of one training job, as the coordinator serves it.

:class:`JobDetail` is what ``GET /api/jobs/{id}``, ``swarm job --json`` (the ``detail_json`` of
``GetJob``), ``/metrics`` and the status page read; ``GET /api/jobs`` lists its
:meth:`JobDetail.summary_json`. The field order is the key order of the JSON. Anything that
reads job JSON reads only keys defined here (tests check the status page's and the metrics'
keys against :data:`JOB_DETAIL_KEYS` / :data:`JOB_SUMMARY_KEYS`).

Values keep the types they had when built (SQLite numbers, the spec and plan as JSON objects):
``JobDetail.from_json(d).to_json() == d`` for every record the coordinator builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

# Steps are numbered from 0: ``step`` k means k + 1 steps are done.


def _exact_keys(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` as a dict, checked to have exactly the fields of ``cls`` (ValueError otherwise)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    want = [f.name for f in fields(cls)]
    need = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing, extra = set(need) - set(data), set(data) - set(want)  # (a field with a default: newer than some servers)
    if missing or extra:
        raise ValueError(f"{where} has missing keys {sorted(missing)} and unexpected keys {sorted(extra)}")
    return dict(data)


def _plain_json(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSummary:
    """The job's model: HF ``model_type``, depth, width and parameter count."""

    family: str | None
    num_layers: int | None
    hidden_size: int | None
    num_parameters: int

    def to_json(self) -> dict[str, Any]:
        return _plain_json(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignmentDetail:
    """One stage worker of the current plan: the node running it and its layers [first, last).
    A helper of a stage (coordinator/jobs/helpers.py) runs the micro-batches ``m`` of
    ``pipeline`` with ``m % share_count == share_index`` there; every other worker runs all of its
    own pipeline's (``pipeline`` = ``replica``, share 0 of 1). A coordinator older than helpers
    sends none of the three."""

    node_id: str
    node_name: str
    stage: int
    replica: int
    layers: tuple[int, int]
    pipeline: int = -1  # -1: not sent (the replica)
    share_index: int = 0
    share_count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.pipeline < 0:
            object.__setattr__(self, "pipeline", self.replica)
        if len(self.layers) != 2:
            raise ValueError(f"assignment layers must be [first, last_excl], got {list(self.layers)}")

    def to_json(self) -> dict[str, Any]:
        out = _plain_json(self)
        out["layers"] = list(self.layers)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressPoint:
    """One completed step (all stage workers reported it): loss, throughput, bytes, time split."""

    step: int
    attempt: int
    loss: float | None  # mean over the replicas' last stages
    tokens: int
    step_s: float
    tokens_per_s: float
    bytes_sent: int  # on the wire, after compression
    bytes_saved: int  # bytes_raw - bytes_sent
    bytes_raw: int  # before compression
    compute_s: float
    wait_s: float
    comm_s: float
    at: float  # coordinator time of the last report, Unix seconds

    def to_json(self) -> dict[str, Any]:
        return _plain_json(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerTotals:
    """Sums over the current attempt's reports of one (stage, replica) worker."""

    stage: int
    replica: int
    step: int  # the latest step it reported
    bytes_sent: int
    bytes_raw: int
    compute_s: float
    wait_s: float
    comm_s: float
    busy_s: float
    bytes_forward: int | None  # bytes_sent split by direction (None from older nodes)
    bytes_backward: int | None

    def to_json(self) -> dict[str, Any]:
        return _plain_json(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSummary:
    step: int
    stage: int
    replica: int
    final: bool

    def to_json(self) -> dict[str, Any]:
        return _plain_json(self)


# What can happen to a job, as ``events`` lists it (``fields`` per kind):
#   submitted (total_steps), planned (attempt, num_stages, num_replicas, num_nodes, checked: spot checks on),
#   node_lost (node, stage, replica, state), replan (attempt, resume_step), resumed (step, attempt),
#   succeeded, failed (last_complete_checkpoint), cancelled,
#   plan_error (error: an unexpected planning failure, the job failed with it),
#   and, reserved for the churn work: replica_dropped / replica_added (node, stage, replica),
#   coordinator_restart,
#   slow_node (node_id, stage, replica, relative_speed, neighbour_wait_fraction, seen_tflops,
#   planned_tflops, attempt: its neighbours saw it below half its planned speed; coordinator/jobs/speed.py),
#   rebalance (node, seen_planned_ratio, predicted_gain, resume_step, rollback, layers_before, layers_after,
#   split_before, split_after, seen_tflops, planned_tflops, decided_at, attempt: the job re-planned its layer
#   split around a slow node at a fence; coordinator/jobs/rebalance.py),
#   checks_void (stage, since_step, step, nodes: a stage's 2 replicas reported different weights through
#   three parameter re-syncs, so the spot checks between them are void; coordinator/jobs/spotchecks.py),
#   disputed (accuser, node, step, reason: one checker found node's result wrong; the job rolls back to
#   before the step and re-plans with the two on different stages, so a second checker decides).
EVENT_KINDS: tuple[str, ...] = (
    "submitted", "planned", "node_lost", "replan", "resumed", "succeeded", "failed", "cancelled", "plan_error",
    "replica_dropped", "replica_added", "coordinator_restart", "coordinator_reconnect", "quarantined", "slow_node",
    "rebalance", "checks_void", "disputed",
)
# Kinds the follow loop marks with "!" (something went wrong or the plan changed under the job).
WARNING_EVENT_KINDS: frozenset[str] = frozenset(
    {"node_lost", "replan", "failed", "cancelled", "plan_error", "replica_dropped", "coordinator_restart",
     "quarantined", "slow_node", "rebalance", "checks_void", "disputed"})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    """One thing that happened to a job, in order (``seq`` grows), with a one-line ``message``."""

    seq: int
    at: float  # coordinator time, Unix seconds
    kind: str  # one of EVENT_KINDS
    message: str
    fields: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = _plain_json(self)
        out["fields"] = dict(self.fields)
        return out


_NESTED: dict[str, type] = {"assignments": AssignmentDetail, "workers": WorkerTotals, "progress": ProgressPoint,
                            "checkpoints": CheckpointSummary, "events": JobEvent}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobDetail:
    """One job: its record, plan, current assignments, per-step history and totals."""

    id: str
    state: str  # pending | running | succeeded | failed | cancelled
    reason: str
    spec: Mapping[str, Any]  # the job spec as JSON (name, compression, batch_size, seq_len, lr, ...)
    model: ModelSummary
    num_samples: int
    dataset_key: str
    total_steps: int
    attempt: int  # 0, then +1 each time the job is re-planned after losing a node
    resume_step: int
    step: int | None  # last completed step; None before the first
    loss: float | None  # of the last completed step
    tokens_per_s: float | None  # of the last completed step
    bytes_sent: int  # summed over the history
    bytes_saved: int  # summed over the history
    eta_s: float | None  # while running and a step took time
    created_at: float  # Unix seconds
    started_at: float | None
    finished_at: float | None
    plan: Mapping[str, Any] | None  # swarm.scheduling.Plan.to_json form
    assignments: tuple[AssignmentDetail, ...]
    workers: tuple[WorkerTotals, ...]
    progress: tuple[ProgressPoint, ...]
    checkpoints: tuple[CheckpointSummary, ...]
    result_ready: bool
    last_complete_checkpoint: int | None
    resumed_from: Mapping[str, Any] | None  # {"job_id", "step"} when started with `swarm train --resume`
    events: tuple[JobEvent, ...]  # oldest first
    repeated_steps: tuple[int, ...]  # steps workers of two attempts both did (work done twice)
    # of those, the steps a rollback to a checkpoint redid (a stage lost without a replica: by
    # design); the others were done twice where the protocol promises not (coordinator/jobs/churn.py)
    rolled_back_steps: tuple[int, ...]
    # training spot checks since the coordinator started (coordinator/jobs/spotchecks.py Judge.stats):
    # {"checks", "weighed", "unverifiable", "mismatches"}
    spot_checks: Mapping[str, int]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("a job detail needs a non-empty id")
        object.__setattr__(self, "repeated_steps", tuple(int(x) for x in self.repeated_steps))
        object.__setattr__(self, "rolled_back_steps", tuple(int(x) for x in self.rolled_back_steps))
        for name, cls in _NESTED.items():
            items = tuple(getattr(self, name))
            if not all(isinstance(x, cls) for x in items):
                raise ValueError(f"job {self.id}: {name} must hold {cls.__name__} records")
            object.__setattr__(self, name, items)
        if not isinstance(self.model, ModelSummary):
            raise ValueError(f"job {self.id}: model must be a ModelSummary")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobDetail:
        """The record of a job JSON object with exactly these keys (ValueError otherwise)."""
        d = _exact_keys(cls, data, "job detail")
        d["model"] = ModelSummary(**_exact_keys(ModelSummary, d["model"], "job detail 'model'"))
        for name, item_cls in _NESTED.items():
            if not isinstance(d[name], (list, tuple)):
                raise ValueError(f"job detail '{name}' must be a list")
            d[name] = tuple(item_cls(**_exact_keys(item_cls, x, f"job detail '{name}' item")) for x in d[name])
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``GET /api/jobs/{id}`` (keys in field order)."""
        out = _plain_json(self)
        out["model"] = self.model.to_json()
        out["repeated_steps"] = list(self.repeated_steps)
        out["rolled_back_steps"] = list(self.rolled_back_steps)
        for name in _NESTED:
            out[name] = [x.to_json() for x in getattr(self, name)]
        return out

    def summary_json(self) -> dict[str, Any]:
        """The JSON object of one job in ``GET /api/jobs``: :data:`JOB_SUMMARY_KEYS`."""
        d = self.to_json()
        out = {k: d[k] for k in SUMMARY_DETAIL_KEYS}
        out["spec"] = {k: self.spec[k] for k in SUMMARY_SPEC_KEYS}
        out["d_pp"] = (self.plan or {}).get("d_pp")
        out["d_dp"] = (self.plan or {}).get("d_dp")
        return out


JOB_DETAIL_KEYS: frozenset[str] = frozenset(f.name for f in fields(JobDetail))
EVENT_KEYS: frozenset[str] = frozenset(f.name for f in fields(JobEvent))
# The detail keys /api/jobs repeats per job, then "spec" (only these keys) and the plan's shape.
SUMMARY_DETAIL_KEYS: tuple[str, ...] = (
    "id", "state", "reason", "total_steps", "step", "loss", "tokens_per_s", "bytes_sent", "bytes_saved", "eta_s",
    "created_at", "started_at", "finished_at", "result_ready", "model", "attempt",
)
SUMMARY_SPEC_KEYS: tuple[str, ...] = ("name", "compression", "batch_size", "seq_len", "lr")
JOB_SUMMARY_KEYS: frozenset[str] = frozenset(SUMMARY_DETAIL_KEYS) | {"spec", "d_pp", "d_dp"}
PROGRESS_KEYS: frozenset[str] = frozenset(f.name for f in fields(ProgressPoint))
WORKER_KEYS: frozenset[str] = frozenset(f.name for f in fields(WorkerTotals))
ASSIGNMENT_KEYS: frozenset[str] = frozenset(f.name for f in fields(AssignmentDetail))


def public_job_json(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job's JSON (detail or summary) as anyone may see it on a ``--public-status`` coordinator:
    without which node runs which part of it (``assignments`` emptied, ``plan`` None, the
    ``node`` field of its events dropped). Progress, loss and totals stay."""
    out = dict(job)
    if "assignments" in out:
        out["assignments"] = []
    if "plan" in out:
        out["plan"] = None
    if isinstance(out.get("events"), (list, tuple)):
        out["events"] = [
            {**e, "fields": {k: v for k, v in dict(e.get("fields") or {}).items() if k != "node"}}
            if isinstance(e, Mapping) else e for e in out["events"]
        ]
    return out
