"""The state handed over at a fence's re-plan (coordinator/jobs/churn.py), on the coordinator's side.

What the coordinator does, around the node's protocol in node/training/state_copy.py:

1. at the re-plan from switch step ``S``, :func:`state_copies` hashes the checkpoint copies it
   resumes each stage from (the live workers' uploads at ``S``); churn.state_sources turns them
   into each new worker's ``state_source`` and each source's ``state_serves``;
2. each worker's ``ready`` report says where its state came from and how many bytes it copied
   (:meth:`AddedReplicas.ready`);
3. when a growth re-plan's attempt starts (the start fence passed), :meth:`AddedReplicas.started`
   records its ``replica_added`` event with ``state_from`` ("peer" | "coordinator"),
   ``state_bytes`` and ``state_sources`` (per added worker).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from swarm.transport.transfer import sha256_file

from coordinator.jobs import churn

WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"


def state_copies(checkpoints: list[dict[str, Any]], by_stage: dict[int, Path], *, step: int) -> dict[int, dict]:
    """stage -> ``{"replica", "weights_sha256", "optimizer_sha256"}`` of the copy in ``by_stage``
    (the coordinator's copy it resumes the stage from at ``step``) that has both files;
    ``checkpoints``: the store's rows of the job (which replica sent each directory)."""
    replica_of = {c["dir"]: c["replica"] for c in checkpoints if c["step"] == step}
    out: dict[int, dict[str, Any]] = {}
    for stage, d in by_stage.items():
        w, o = Path(d) / WEIGHTS, Path(d) / OPTIMIZER
        if str(d) in replica_of and w.is_file() and o.is_file():
            out[stage] = {"replica": replica_of[str(d)], "weights_sha256": sha256_file(w),
                          "optimizer_sha256": sha256_file(o)}
    return out


class AddedReplicas:
    """The ``replica_added`` events of growth re-plans, recorded once their attempt starts. Thread-safe.

    The added workers are marked in the re-plan's assignments (``"added": true``, stored with the
    job), so a coordinator restarted before the start fence still records the event (the workers
    repeat their ``ready`` reports until the fence passes)."""

    def __init__(self, store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, int], dict[str, tuple[str, int]]] = {}  # -> worker -> (from, bytes)

    def ready(self, job_id: str, attempt: int, worker: str, *, state_from: str, state_bytes: int) -> None:
        """A worker's ``ready`` report said where its state came from (``worker``: "stage:replica")."""
        if state_from:
            with self._lock:
                self._reports.setdefault((job_id, attempt), {})[worker] = (state_from, int(state_bytes))

    def started(self, job, *, optim: str) -> None:
        """``job``'s attempt passed its start fence: record its ``replica_added`` event, if it grew.
        ``optim``: what the message says about the optimizer state."""
        with self._lock:
            reports = self._reports.pop((job.id, job.attempt), {})
        mine = [a for a in job.assignments if a.get("added")]
        if not mine:
            return
        keys = sorted(churn.key(a["stage"], a["replica"]) for a in mine)
        added = sorted({a["node_id"] for a in mine})
        num_replicas = max(a["num_replicas"] for a in job.assignments)
        source, num_bytes = churn.summarize_state_from(reports, keys)
        per_worker = [{"worker": k, "state_from": reports.get(k, ("coordinator", 0))[0],
                       "bytes": reports.get(k, ("coordinator", 0))[1]} for k in keys]
        where = "copied from a live replica, hash-checked" if source == "peer" else "from the coordinator's checkpoint"
        helper = any(a.get("share_index", 0) > 0 for a in mine)  # helpers of one stage (coordinator/jobs/helpers.py)
        stage = mine[0]["stage"] if helper else None
        what = (f"joined as helper replica(s) of stage {stage}, the slowest (each runs half of its pipeline's "
                f"micro-batches there)" if helper else f"joined as new replica(s): {num_replicas} replica(s)")
        self.store.add_event(job.id, "replica_added", f"{len(added)} idle node(s) {what} from step {job.resume_step}, "
                             f"weights and optimizer state {where} ({num_bytes} bytes; {optim}), no rollback",
                             added=added, num_replicas=num_replicas, resume_step=job.resume_step, attempt=job.attempt,
                             state_from=source, state_bytes=num_bytes, state_sources=per_worker, helper=helper,
                             stage=stage)
