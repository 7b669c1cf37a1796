"""A stage assignment as the node sees it (domain object built from the protobuf message)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from swarm.errors import InvalidRequestError
from swarm.job_spec import JobSpec
from swarm.proto.v1 import training_pb2 as pb
from swarm.transport.jobs import job_spec_from_pb

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_HOLDERS = 8  # holders of one stage in one pipeline (a pipeline's worker and its helpers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    node_id: str
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DroppedShare:
    """A holder-loss fence's lost holder (coordinator/jobs/churn.py ``holder_loss``) and the
    micro-batches it ran at its stage: those are dropped from the steps in flight."""

    node_id: str
    stage: int
    share_index: int
    share_count: int

    def holds(self, micro_batch: int) -> bool:
        return micro_batch % self.share_count == self.share_index


def dropped_from_pb(items) -> tuple[DroppedShare, ...]:
    """``fence_dropped`` of a ProgressAck or StageAssignment; malformed entries are left out."""
    return tuple(DroppedShare(node_id=d.node_id, stage=d.stage, share_index=d.share_index, share_count=d.share_count)
                 for d in list(items)[:MAX_HOLDERS] if 2 <= d.share_count <= MAX_HOLDERS
                 and 0 <= d.share_index < d.share_count and d.node_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSource:
    """Where a re-planned worker copies its stage's state at ``step`` from (the ``peer`` saved it
    as ``stage`` of the attempt that fenced), and the SHA-256 (hex) of the files the coordinator
    holds from that worker: a copy must match them."""

    peer: Peer
    stage: int
    step: int
    weights_sha256: str
    optimizer_sha256: str
    required: bool = False  # the coordinator has no good copy: this one or none (no fallback)

    def __post_init__(self) -> None:
        if not all(_SHA256.match(h) for h in (self.weights_sha256, self.optimizer_sha256)):
            raise InvalidRequestError("state source hashes must be 64 lowercase hex digits")
        if self.step < 1:
            raise InvalidRequestError("a state source names a step >= 1")

    @property
    def hashes(self) -> dict[str, str]:
        """file name -> SHA-256 the copy must have (the files of node/training/checkpoints.py)."""
        return {"weights.safetensors": self.weights_sha256, "optimizer.safetensors": self.optimizer_sha256}


@dataclass(frozen=True, slots=True, kw_only=True)
class StateServe:
    """This node's saved state of ``stage`` at ``step`` may be sent to ``node_ids`` (and only them)."""

    stage: int
    step: int
    node_ids: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeptStage:
    """A worker (``stage``, ``replica``, on ``peer``) whose periodic checkpoints this node keeps a
    second copy of (node/training/kept.py)."""

    peer: Peer
    stage: int
    replica: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    job_id: str
    attempt: int
    stage: int
    num_stages: int
    replica: int
    num_replicas: int
    first_layer: int
    last_layer_excl: int
    prev: Peer | None
    next: Peer | None
    stage_replicas: tuple[Peer, ...]
    spec: JobSpec  # resolved by the coordinator: steps, stages and replicas filled in
    model_config: dict[str, Any]
    num_samples: int
    dataset_key: str
    resume_step: int = 0  # a re-planned job starts at this step from the coordinator's checkpoint
    fence: bool = False  # the coordinator is fencing this attempt (node/training/membership.py)
    switch_step: int = 0  # the fence's switch step, 0 until decided
    fence_all_live: bool = False  # the fence lost no node: replicas keep averaging through it
    fence_live_members: tuple[int, ...] = ()  # a fence that lost one: who merges at the switch step (membership.py)
    fence_dropped: tuple[DroppedShare, ...] = ()  # a holder-loss fence: micro-batches dropped in flight
    verify_json: str = ""  # spot checks: node/training/spotcheck.py VerifyPlan.from_json
    state_source: StateSource | None = None  # a fence's re-plan: copy the state at resume_step from this peer
    state_serves: tuple[StateServe, ...] = ()  # ... and what this node sends to the workers copying from it
    checkpoint_keeper: Peer | None = None  # the node that keeps a second copy of our checkpoints
    keeps: tuple[KeptStage, ...] = ()  # the workers whose checkpoints this node keeps a copy of
    # A stage shared by holders within a pipeline (a helper replica of a slow stage,
    # coordinator/jobs/helpers.py): the pipeline whose micro-batches this worker runs (None: its
    # replica), which of them (m % share_count == share_index), and the neighbour stages' holders
    # in this pipeline by share index (empty: ``prev`` / ``next`` alone).
    pipeline: int | None = None
    share_index: int = 0
    share_count: int = 1
    prev_holders: tuple[Peer, ...] = ()
    next_holders: tuple[Peer, ...] = ()

    def __post_init__(self) -> None:
        if self.pipeline is None:
            object.__setattr__(self, "pipeline", self.replica)
        if not (0 <= self.stage < self.num_stages and 0 <= self.pipeline < self.num_replicas and self.replica >= 0):
            raise InvalidRequestError("assignment stage/replica out of range")
        if not (1 <= self.share_count <= MAX_HOLDERS and 0 <= self.share_index < self.share_count):
            raise InvalidRequestError("assignment's micro-batch share out of range")
        # a pipeline's own worker holds its replica's index; a helper an index past the pipelines
        helper = self.replica >= self.num_replicas
        if (self.replica == self.pipeline) == helper or (self.share_index > 0) != helper:
            raise InvalidRequestError("assignment's replica does not match its pipeline and share")
        for holders, one in ((self.prev_holders, self.prev), (self.next_holders, self.next)):
            if holders and (len(holders) > MAX_HOLDERS or one is None or holders[0] != one):
                raise InvalidRequestError("assignment's neighbour holders do not match its neighbours")
        if (self.stage > 0) != (self.prev is not None) or (self.stage < self.num_stages - 1) != (self.next is not None):
            raise InvalidRequestError("assignment neighbours do not match its stage position")
        if self.spec.steps < 1 or self.num_samples < 1:
            raise InvalidRequestError("assignment without steps or samples")
        if not 0 <= self.resume_step < self.spec.steps:
            raise InvalidRequestError("assignment resumes outside the job's steps")
        if self.state_source is not None and self.state_source.step != self.resume_step:
            raise InvalidRequestError("assignment's state source is not at its resume step")
        if any(not (0 <= k.stage < self.num_stages and k.replica >= 0 and k.peer.node_id) for k in self.keeps):
            raise InvalidRequestError("assignment keeps checkpoints of a stage outside the job")

    def owns(self, micro_batch: int) -> bool:
        """Whether this worker runs ``micro_batch`` of its pipeline (the others are its stage's other holders')."""
        return micro_batch % self.share_count == self.share_index

    def prev_for(self, micro_batch: int) -> Peer | None:
        """The previous stage's holder of ``micro_batch`` in this pipeline (None on stage 0)."""
        return self.prev_holders[micro_batch % len(self.prev_holders)] if self.prev_holders else self.prev

    def next_for(self, micro_batch: int) -> Peer | None:
        """The next stage's holder of ``micro_batch`` in this pipeline (None on the last stage)."""
        return self.next_holders[micro_batch % len(self.next_holders)] if self.next_holders else self.next

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)

    @classmethod
    def from_pb(cls, m: pb.StageAssignment) -> "Assignment":
        def peer(p, present: bool) -> Peer | None:
            return Peer(node_id=p.node_id, address=p.address) if present else None

        return cls(
            job_id=m.job_id, attempt=m.attempt, stage=m.stage, num_stages=m.num_stages, replica=m.replica,
            num_replicas=m.num_replicas, first_layer=m.first_layer, last_layer_excl=m.last_layer_excl,
            prev=peer(m.prev, m.HasField("prev")), next=peer(m.next, m.HasField("next")),
            stage_replicas=tuple(Peer(node_id=p.node_id, address=p.address) for p in m.stage_replicas),
            spec=job_spec_from_pb(m.spec), model_config=json.loads(m.model_config_json), num_samples=m.num_samples,
            dataset_key=m.dataset_key, resume_step=m.resume_step, fence=m.fence, switch_step=m.switch_step,
            fence_all_live=m.fence_all_live, fence_live_members=tuple(m.fence_live_members),
            fence_dropped=dropped_from_pb(m.fence_dropped),
            verify_json=m.verify_json,
            state_source=StateSource(peer=peer(m.state_source.peer, True), stage=m.state_source.stage,
                                     step=m.state_source.step,
                                     weights_sha256=m.state_source.weights_sha256,
                                     optimizer_sha256=m.state_source.optimizer_sha256,
                                     required=m.state_source.required)
            if m.HasField("state_source") else None,
            state_serves=tuple(StateServe(stage=s.stage, step=s.step, node_ids=frozenset(s.node_ids))
                               for s in m.state_serves[:64]),
            checkpoint_keeper=peer(m.checkpoint_keeper, m.HasField("checkpoint_keeper")),
            keeps=tuple(KeptStage(peer=Peer(node_id=k.peer.node_id, address=k.peer.address), stage=k.stage,
                                  replica=k.replica) for k in m.keeps[:64]),
            pipeline=m.pipeline if m.has_pipeline else None, share_index=m.share_index,
            share_count=max(1, m.share_count),
            prev_holders=tuple(Peer(node_id=p.node_id, address=p.address) for p in m.prev_holders[:MAX_HOLDERS + 1]),
            next_holders=tuple(Peer(node_id=p.node_id, address=p.address) for p in m.next_holders[:MAX_HOLDERS + 1]),
        )
