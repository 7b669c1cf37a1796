"""Protobuf <-> domain objects for training jobs: :class:`~swarm.job_spec.JobSpec` and progress.

Every field is named here (no reflection over descriptors), so adding a field to the message or
the dataclass is a visible change in both directions. The codec travels as its canonical text in
``JobSpec.compression`` and is parsed once, on receipt, into a CodecSpec.
"""

from __future__ import annotations

import math
from typing import Any

from swarm.errors import InvalidRequestError
from swarm.job_spec import DEFAULT_VERIFY_PROB, JobSpec
from swarm.proto.v1 import training_pb2 as pb


def job_spec_to_pb(spec: JobSpec) -> pb.JobSpec:
    # node_wait_s travels only when it is not the default (as in JobSpec.to_dict)
    wait = {} if spec.node_wait_s == JobSpec().node_wait_s else {"node_wait_s": spec.node_wait_s}
    return pb.JobSpec(
        name=spec.name, steps=spec.steps, epochs=spec.epochs, batch_size=spec.batch_size,
        micro_batch_size=spec.micro_batch_size, seq_len=spec.seq_len, lr=spec.lr, compression=str(spec.codec),
        checkpoint_every=spec.checkpoint_every, seed=spec.seed, warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay, grad_clip=spec.grad_clip, schedule=spec.schedule, num_stages=spec.num_stages,
        num_replicas=spec.num_replicas, peer_timeout_s=spec.peer_timeout_s, min_lr_ratio=spec.min_lr_ratio,
        **wait,
        # 0 on the wire (unset) means "the default", a negative value "off"
        verify_prob=0.0 if spec.verify_prob == DEFAULT_VERIFY_PROB else spec.verify_prob if spec.verify_prob > 0 else -1.0,
    )


def job_spec_from_pb(m: pb.JobSpec) -> JobSpec:
    """Validate a received spec. Empty strings (name, compression, schedule) take the defaults;
    numbers are taken as sent. Raises InvalidRequestError naming the flag to fix."""
    return JobSpec.from_dict({
        "name": m.name, "steps": m.steps, "epochs": m.epochs, "batch_size": m.batch_size,
        "micro_batch_size": m.micro_batch_size, "seq_len": m.seq_len, "lr": m.lr, "compression": m.compression,
        "checkpoint_every": m.checkpoint_every, "seed": m.seed, "warmup_steps": m.warmup_steps,
        "weight_decay": m.weight_decay, "grad_clip": m.grad_clip, "schedule": m.schedule, "num_stages": m.num_stages,
        "num_replicas": m.num_replicas, "peer_timeout_s": m.peer_timeout_s, "min_lr_ratio": m.min_lr_ratio,
        # unset (a client from before the field): the default
        "node_wait_s": m.node_wait_s if m.HasField("node_wait_s") else None,
        "verify_prob": None if m.verify_prob == 0 else max(0.0, m.verify_prob),
    })


# running/done/failed: training; ready/fence/fenced: the fences of node/training/membership.py
PROGRESS_STATES = ("running", "done", "failed", "ready", "fence", "fenced")
# where a worker's stage state at its resume step came from ("": not said, a node before the field)
STATE_FROM = ("", "local", "peer", "coordinator")


def state_source_to_pb(src: dict[str, Any] | None) -> pb.StateSource | None:
    """A coordinator assignment's ``state_source`` (coordinator/jobs/churn.py state_sources)."""
    if not src:
        return None
    return pb.StateSource(peer=pb.PeerRef(node_id=src["node_id"], address=src["address"]), step=int(src["step"]),
                          weights_sha256=src["weights_sha256"], optimizer_sha256=src["optimizer_sha256"],
                          stage=int(src["stage"]), required=bool(src.get("required")))


def keeper_to_pb(k: dict[str, Any] | None) -> pb.PeerRef | None:
    """An assignment's ``checkpoint_keeper`` (coordinator/jobs/churn.py with_keepers)."""
    return pb.PeerRef(node_id=k["node_id"], address=k["address"]) if k else None


def keeps_to_pb(keeps: list[dict[str, Any]] | None) -> list[pb.KeptStage]:
    return [pb.KeptStage(peer=pb.PeerRef(node_id=k["node_id"], address=k["address"]), stage=int(k["stage"]),
                         replica=int(k["replica"])) for k in keeps or ()]


def state_serves_to_pb(serves: list[dict[str, Any]] | None) -> list[pb.StateServe]:
    return [pb.StateServe(stage=int(s["stage"]), step=int(s["step"]), node_ids=list(s["node_ids"]))
            for s in serves or ()]


# A worker's commitments (node/training/commitments.py): the tensors of a micro-batch it commits
# to, and the size of a digest; at most one per micro-batch and kind (4096 micro-batches a step)
DIGEST_WHATS = ("input", "output", "output_ref", "grad_out", "grad_in", "input_ref")
COPY_WHATS = DIGEST_WHATS[:5]  # what a checker's copies may be (input_ref is the witness's own word only)
DIGEST_BYTES = 16
MAX_DIGESTS = len(DIGEST_WHATS) * 4096


def digests_from_pb(items, *, limit: int, whats: tuple[str, ...] = DIGEST_WHATS) -> dict[tuple[int, str], bytes]:
    """Repeated TensorDigest -> {(micro_batch, what): digest}. Raises InvalidRequestError."""
    if len(items) > limit:
        raise InvalidRequestError(f"at most {limit} tensor digests in one report, got {len(items)}")
    out: dict[tuple[int, str], bytes] = {}
    for d in items:
        key = (int(d.micro_batch), d.what)
        if d.what not in whats or not 0 <= key[0] < 4096 or len(d.digest) != DIGEST_BYTES:
            raise InvalidRequestError(f"a tensor digest must name one of {', '.join(whats)}, a micro-batch "
                                      f"in 0..4095 and hold {DIGEST_BYTES} bytes")
        if out.setdefault(key, bytes(d.digest)) != d.digest:
            raise InvalidRequestError(f"two different digests of micro-batch {key[0]}'s {key[1]} in one report")
    return out


def progress_from_pb(m: pb.ProgressReport) -> dict[str, Any]:
    """A node's progress report as the job service takes it; ``loss`` None when absent or not
    finite. Raises InvalidRequestError on out-of-range fields."""
    r: dict[str, Any] = {
        "job_id": m.job_id, "attempt": m.attempt, "stage": m.stage, "replica": m.replica, "step": m.step,
        "has_loss": m.has_loss, "loss": m.loss if m.has_loss and math.isfinite(m.loss) else None,
        "tokens_per_s": m.tokens_per_s, "bytes_sent": m.bytes_sent, "bytes_raw": m.bytes_raw, "step_s": m.step_s,
        "compute_s": m.compute_s, "wait_s": m.wait_s, "comm_s": m.comm_s, "state": m.state, "error": m.error,
        "tokens": m.tokens, "bytes_forward": m.bytes_forward, "bytes_backward": m.bytes_backward,
        "wait_activation_s": m.wait_activation_s, "wait_gradient_s": m.wait_gradient_s,
    }
    for k in ("tokens_per_s", "step_s", "compute_s", "wait_s", "comm_s", "wait_activation_s", "wait_gradient_s"):
        if not math.isfinite(r[k]) or r[k] < 0:
            raise InvalidRequestError(f"progress field {k} must be finite and >= 0")
    for k in ("bytes_sent", "bytes_raw", "bytes_forward", "bytes_backward", "tokens"):
        if not 0 <= r[k] <= 1 << 50:
            raise InvalidRequestError(f"progress field {k} must be in 0..2^50")
    if r["state"] not in PROGRESS_STATES:
        raise InvalidRequestError(f"progress state must be one of {', '.join(PROGRESS_STATES)}")
    if len(m.micro_batch_losses) > 4096 or len(m.checks) > 256 or len(m.blame_node_id) > 64 or \
            len(m.param_digest) > 64 or len(m.param_sketch) > 256:
        raise InvalidRequestError("too many micro-batch losses, spot checks or sketch values in one report")
    if not all(math.isfinite(v) for v in m.param_sketch):
        raise InvalidRequestError("param_sketch values must be finite")
    r["micro_batch_losses"] = [float(v) for v in m.micro_batch_losses]
    r["checks"] = [{"stage": c.stage, "replica": c.replica, "step": c.step, "micro_batch": c.micro_batch,
                    "what": c.what[:16], "match": c.match, "error": c.error, "tolerance": c.tolerance,
                    "repeated_match": c.repeated_match, "value": c.value,
                    "copies": {w: d for (_, w), d in digests_from_pb(c.copies, limit=len(COPY_WHATS),
                                                                           whats=COPY_WHATS).items()}}
                   for c in m.checks]
    if any(d.micro_batch != c.micro_batch for c in m.checks for d in c.copies):
        raise InvalidRequestError("a spot check's copies must be of its own micro-batch")
    r["digests"] = digests_from_pb(m.digests, limit=MAX_DIGESTS)
    if m.state_from not in STATE_FROM or not 0 <= m.state_bytes <= 1 << 50:
        raise InvalidRequestError(f"progress state_from must be one of {STATE_FROM} and state_bytes in 0..2^50")
    r["state_from"], r["state_bytes"] = m.state_from, int(m.state_bytes)
    if not 0 <= m.kept_step <= 1 << 50:
        raise InvalidRequestError("progress kept_step must be in 0..2^50")
    r["kept_step"] = int(m.kept_step)
    r["blame_node_id"] = m.blame_node_id
    r["param_digest"] = m.param_digest
    r["param_sketch"] = tuple(float(v) for v in m.param_sketch)
    return r
