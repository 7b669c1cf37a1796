"""A second copy of other workers' checkpoints, kept on this node (docs/training.md, "Checkpoints").

The coordinator names, for each worker whose upload is the coordinator's copy of its stage
(replica 0), a *checkpoint keeper*: another node of the job (coordinator/jobs/churn.py
:func:`~coordinator.jobs.churn.checkpoint_keepers`). The keeper's assignment lists the workers it
keeps (``keeps``); the worker's lists its keeper (``checkpoint_keeper``).

Protocol, on the keeper: at each periodic checkpoint step ``N`` (every worker checkpoints at the
same steps), :meth:`CheckpointKeeper.submit` queues ``N``; a background thread asks each kept
worker's node for its checkpoint of step ``N`` with ``PipelinePeer.FetchStageState`` (``step`` and
``replica`` set), over the same TLS channel and transfer module as the state copy of a re-plan
(node/training/state_copy.py :func:`~node.training.state_copy.fetch_files`). The worker's node
answers only the keeper its own assignment names, and UNAVAILABLE until the checkpoint is on its
disk (asked again for up to ``timeout_s``). Files are size-bounded and checked against their
headers' SHA-256, land in a temporary directory, are made 0600 and renamed at once to
``training/<job>/kept-stage-<S>/step-<N>/``; the newest :data:`KEEP` steps are kept. Training
never waits for this, and a failed copy is only logged: the coordinator's copy is the first one.
Each progress report carries ``kept_step``, the newest step kept of every kept worker; the
coordinator marks those copies ``kept`` and resumes a lost stage only from a step its keeper
reported.

When the coordinator's copy of a stage is missing or corrupt at a re-plan, it names the keeper
as that stage's ``state_source`` (``required``), with the SHA-256 it recorded at upload; the
re-planned worker copies the kept files from it and refuses any other bytes (state_copy.py).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from pathlib import Path

from swarm.errors import SwarmError
from swarm.proto.v1 import training_pb2 as pb

from node.training.assignment import Assignment
from node.training.state_copy import STATE_FILES, fetch_files

log = logging.getLogger(__name__)
KEEP = 2  # newest kept steps per stage (as many as the worker keeps of its own)
FETCH_TIMEOUT_S = 120.0  # how long a worker may take to write a checkpoint after the keeper's own


def kept_dir(state_dir: Path, job_id: str, stage: int, step: int) -> Path:
    return Path(state_dir) / "training" / job_id / f"kept-stage-{stage}" / f"step-{step:08d}"


class CheckpointKeeper:
    """Fetches the checkpoints of ``a.keeps`` in the background (see the module docstring)."""

    def __init__(self, a: Assignment, *, state_dir: Path, security, stop: threading.Event,
                 timeout_s: float = FETCH_TIMEOUT_S) -> None:
        self.a = a
        self.state_dir = Path(state_dir)
        self.security = security
        self.timeout_s = timeout_s
        self._stop = stop
        self.kept: list[tuple[int, int]] = []  # (stage, step) copies made, for tests and logs
        self.newest = 0  # the newest step of which every kept worker's copy is here (progress reports)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-keeper", daemon=True)
        self._thread.start()

    def submit(self, step: int) -> None:
        if self.a.keeps:
            self._queue.put(step)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def wait(self) -> None:
        """Block until every submitted step was copied or given up (tests)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            step = self._queue.get()
            try:
                if step is None:
                    return
                done = 0
                for k in self.a.keeps:
                    if self._stop.is_set():
                        break
                    try:
                        self.keep(k.stage, k.replica, k.peer, step)
                        done += 1
                    except (SwarmError, OSError) as exc:
                        log.warning("no second copy of job=%s stage=%d step=%d from node %s: %s", self.a.job_id,
                                    k.stage, step, k.peer.node_id[:12], exc)
                if done == len(self.a.keeps):
                    self.newest = max(self.newest, step)
            finally:
                self._queue.task_done()

    def keep(self, stage: int, replica: int, peer, step: int) -> Path:
        """Copy ``peer``'s checkpoint of ``stage``/``replica`` at ``step`` here; returns its dir."""
        a = self.a
        final = kept_dir(self.state_dir, a.job_id, stage, step)
        tmp = final.with_name(f".incoming-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        req = pb.FetchStageStateRequest(job_id=a.job_id, stage=stage, attempt=a.attempt, step=step, replica=replica)
        n = fetch_files(peer, req, expected=None, security=self.security, dest=tmp, timeout_s=self.timeout_s,
                        what=f"stage {stage}'s checkpoint of step {step}")
        for name in STATE_FILES:
            os.chmod(tmp / name, 0o600)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # whole or not at all: local_state_dir only sees complete copies
        for old in sorted(p for p in final.parent.glob("step-*") if p.is_dir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        self.kept.append((stage, step))
        log.info("kept a copy of job=%s stage=%d step=%d from node %s bytes=%d", a.job_id, stage, step,
                 peer.node_id[:12], n)
        return final
