"""The worker-facing side of the job service (:class:`Reporting`, a part of
:class:`coordinator.jobs.service.JobService`): assignments, progress reports and rendezvous.

- ``assignments_for(node)``: what the node's workers run (its jobs' assignments, the current
  attempt only); ``assignment_of`` authorizes a worker's calls against it.
- ``report``: a worker's progress report (steps done with loss and timings, spot-check results,
  blames, waits for its neighbours, fence and ready states, kept checkpoint steps). Every field
  is validated against the caller's assignment; the answer (:class:`Ack`) tells the worker
  whether to go on, stop at a fence's switch step, or drop the job. A report after a
  coordinator restart marks the job reconnected (its events say so).
- ``rendezvous``: the hivemind multiaddrs of a stage's replicas, for their averaging group.

The host class provides ``store``, ``clock``, ``judge``, ``speeds``, ``added``, ``state_dir``,
``_lock`` and the job bookkeeping it updates (``_ready``, ``_replans``, ``_resumed``,
``_restarted`` (jobs since a coordinator restart), ``_restarted_nodes`` (nodes whose process restarted), ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from swarm.errors import InvalidRequestError, PermissionDeniedError

from coordinator.jobs import churn, files, keepers
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to a progress report (ProgressAck)."""

    stop: bool = False
    reason: str = ""
    start: bool = False
    fence: bool = False
    switch_step: int = 0
    fence_all_live: bool = False  # the fence lost no node: replicas keep averaging (churn.fence_all_live)
    fence_live_members: tuple[int, ...] = ()  # a fence that lost one: who merges at the switch step (churn.live_members)
    fence_dropped: tuple[dict, ...] = ()  # a holder-loss fence's lost shares (churn.holder_loss)


class Reporting:
    """Reports and assignments for :class:`~coordinator.jobs.service.JobService`."""

    def assignment_of(self, job_id: str, node_id: str, *, stage: int | None = None, replica: int | None = None
                      ) -> tuple[Job, dict[str, Any]]:
        job = self.store.get(job_id)
        for a in job.assignments:
            if a["node_id"] == node_id and (stage is None or a["stage"] == stage) and (
                    replica is None or a["replica"] == replica):
                return job, a
        raise PermissionDeniedError(f"node {node_id[:12]} holds no such part of job {job_id}")

    def assignments_for(self, node_id: str) -> tuple[list[tuple[Job, dict[str, Any]]], list[str]]:
        """(running assignments of the node, ids of recently ended jobs the node must stop)."""
        active, stop = [], []
        now = self.clock.time()
        for job in self.store.list(limit=200):
            mine = [a for a in job.assignments if a["node_id"] == node_id]
            if job.fence is not None:  # the broken pipelines' workers stop (reconcile: unassigned)
                mine = [a for a in mine if churn.key(a["stage"], a["replica"]) in job.fence["workers"]]
            if not mine:
                continue
            if job.state == "running":
                active += [(job, a) for a in mine]
            elif job.state in ("failed", "cancelled") and now - (job.finished_at_s or now) < 600:
                stop.append(job.id)
        return active, stop

    def report(self, node_id: str, r: dict[str, Any]) -> Ack:
        """Record one progress report (or a fence's ``ready``/``fence``/``fenced``); returns the
        answer for the node (stop, start, fence, switch step)."""
        job, a = self.assignment_of(r["job_id"], node_id, stage=r["stage"], replica=r["replica"])
        if job.terminal:
            if job.state == "succeeded" and r["state"] == "running" and r["attempt"] == job.attempt \
                    and 0 <= r["step"] < job.total_steps:
                # a step done before the end whose report was held up (re-sent after a coordinator
                # outage, behind the final checkpoints that ended the job): it still counts
                self._add_progress(job, a, r, attempt=job.attempt)
            return Ack(stop=True, reason=f"job is {job.state}: {job.reason}")
        self._reconnected(job)
        if r["attempt"] != job.attempt:
            if r["state"] == "running" and r["attempt"] < job.attempt and 0 <= r["step"] < job.resume_step:
                self._add_progress(job, a, r, attempt=r["attempt"])  # done before the switch: a late report
            return Ack(stop=True, reason=f"stale attempt {r['attempt']} (job is at attempt {job.attempt})")
        if job.state != "running":
            return Ack(stop=True, reason=f"job is {job.state}: {job.reason}")
        blamed = r.get("blame_node_id") or ""
        if r["state"] == "failed" and blamed and blamed != node_id and any(
                x["node_id"] == blamed for x in job.assignments):
            # weighed after peer_timeout_s (coordinator/jobs/spotchecks.py Judge.resolve_blames)
            self.judge.blame(job.id, node_id, blamed, self.clock.time(), attempt=job.attempt)
            log.warning("stage failed blaming a neighbour job=%s reporter=%s blamed=%s: %s", job.id, node_id[:12],
                        blamed[:12], r["error"][:300])
        if r["state"] == "failed":
            if r["error"].startswith("PeerError"):
                # its neighbour stopped answering: usually a lost node the sweeper is about to report,
                # which re-plans the job; if no node is lost, _watch re-plans it after a grace period
                self._peer_failed.setdefault((job.id, job.attempt), (self.clock.time(), (
                    f"stage {a['stage']} replica {a['replica']} lost contact with a neighbour: {r['error'][:300]}")))
                return Ack(stop=True, reason="waiting for the coordinator to re-plan")
            self._fail(job, f"stage {a['stage']} replica {a['replica']} on node {node_id[:12]} failed: "
                            f"{r['error'][:500]}; {self._checkpoint_note(job.id)}")
            return Ack(stop=True, reason="job failed")
        if job.fence is not None and churn.key(a["stage"], a["replica"]) not in job.fence["workers"]:
            return Ack(stop=True, reason="this replica was dropped (its pipeline lost a node)")
        if r["state"] in ("ready", "fence", "fenced"):
            # following the protocol is not stalling: a stage 0 waiting at a fence for its switch
            # step, or a worker stopped there, sends no step progress but is not silent
            self.judge.progress(job.id, node_id, self.clock.time())
        if r["state"] == "ready" and job.started_attempt >= job.attempt and self.store.worker_progressed(
                job.id, attempt=job.attempt, stage=a["stage"], replica=a["replica"]):
            # only a new process sets a worker up again: its node restarted; _watch treats it as lost
            self._restarted_nodes.setdefault((job.id, job.attempt), set()).add(node_id)
            log.warning("worker set up again after running steps: node restarted job=%s node=%s stage=%d replica=%d",
                        job.id, node_id[:12], a["stage"], a["replica"])
            return Ack(stop=True, reason="this node restarted and lost its worker's state; the job goes on without it")
        if r["state"] == "ready":
            self.added.ready(job.id, job.attempt, churn.key(a["stage"], a["replica"]),
                             state_from=r.get("state_from", ""), state_bytes=r.get("state_bytes", 0))
            return Ack(start=self._on_ready(job, a))
        if r["state"] in ("fence", "fenced"):
            return self._on_fence_report(job, a, r)
        if r.get("kept_step") and self._kept_seen.get((job.id, node_id)) != r["kept_step"]:
            self._kept_seen[(job.id, node_id)] = r["kept_step"]
            self.store.mark_kept(job.id, stages=keepers.kept_stages(job.assignments, node_id), step=r["kept_step"])
        if r["state"] == "running" and not 0 <= r["step"] < job.total_steps:
            raise InvalidRequestError(f"progress for step {r['step']} outside 0..{job.total_steps - 1}")
        if r["state"] == "running" and job.resume_step and r["step"] == job.resume_step and \
                (job.id, job.attempt) not in self._resumed:
            self._resumed.add((job.id, job.attempt))
            self.store.add_event(job.id, "resumed", f"resumed at step {job.resume_step} (attempt {job.attempt})",
                                 step=job.resume_step, attempt=job.attempt)
        if r["state"] == "running":
            self.judge.progress(job.id, node_id, self.clock.time())
            for v in self.judge.report(job.id, job.attempt, a, job.assignments, r,
                                       micro_batches=job.spec.micro_batches(a["num_replicas"])):
                self._quarantine(job, v)
            for message, fields in self.judge.take_notices(job.id):
                self.store.add_event(job.id, "checks_void", message, **fields)
            self._add_progress(job, a, r, attempt=job.attempt)
            self.speeds.report(job, a, r)
            self._replans.pop(job.id, None)  # progress: the re-plans so far worked
        fence = job.fence
        return Ack(fence=fence is not None, switch_step=fence["switch_step"] if fence else 0,
                   fence_all_live=churn.fence_all_live(fence),
                   fence_live_members=tuple(churn.live_members(fence, job.assignments, a["stage"])),
                   fence_dropped=tuple((fence or {}).get("dropped") or ()))

    def _add_progress(self, job: Job, a: dict[str, Any], r: dict[str, Any], *, attempt: int) -> None:
        self.store.add_progress(job.id, attempt=attempt, stage=a["stage"], replica=a["replica"],
                                step=r["step"], loss=r["loss"], tokens=r["tokens"], tokens_per_s=r["tokens_per_s"],
                                bytes_sent=r["bytes_sent"], bytes_raw=r["bytes_raw"], step_s=r["step_s"],
                                compute_s=r["compute_s"], wait_s=r["wait_s"], comm_s=r["comm_s"],
                                bytes_forward=r["bytes_forward"], bytes_backward=r["bytes_backward"])

    def _on_ready(self, job: Job, a: dict[str, Any]) -> bool:
        """The start fence: True once every worker of the job's attempt reported ready."""
        if job.started_attempt >= job.attempt:
            return True
        with self._lock:
            ready = self._ready.setdefault((job.id, job.attempt), set())
            ready.add(churn.key(a["stage"], a["replica"]))
            if not churn.all_ready(job.assignments, ready):
                return False
            self.store.set_started(job.id, job.attempt)
            self._ready.pop((job.id, job.attempt), None)
            resume = files.job_dir(self.state_dir, job.id) / f"resume-{job.resume_step}"
            optim = (resume / files.OPTIMIZER_FILE).is_file()
            self.added.started(job, optim="with its optimizer state" if optim else "optimizer state restarts")
        log.info("attempt started job=%s attempt=%d (every worker acknowledged it)", job.id, job.attempt)
        return True

    def _on_fence_report(self, job: Job, a: dict[str, Any], r: dict[str, Any]) -> Ack:
        with self._lock:
            job = self.store.get(job.id)
            if job.attempt != r["attempt"] or job.state != "running":
                # the job moved on since report() looked (a fence completed under this lock): a stale
                # boundary applied to the new attempt's fence would set its switch step below that
                # attempt's resume step, and the steps between were done twice
                return Ack(stop=True, reason=f"stale attempt {r['attempt']} (job is at attempt {job.attempt})")
            fence = job.fence
            if fence is None:
                return Ack()
            new = churn.on_fence_report(fence, stage=a["stage"], replica=a["replica"], state=r["state"], step=r["step"])
            if new != fence:
                self.store.set_fence(job.id, new, expect_attempt=job.attempt)
                if new["switch_step"] and not fence["switch_step"]:
                    log.info("fence switch step job=%s attempt=%d step=%d", job.id, job.attempt, new["switch_step"])
                if churn.fence_complete(new):
                    self._complete_fence(self.store.get(job.id))
                elif churn.fence_overrun(new) and not churn.fence_overrun(fence):
                    log.warning("fence overrun job=%s attempt=%d worker=%s step=%d switch_step=%d", job.id,
                                job.attempt, churn.key(a["stage"], a["replica"]), r["step"], new["switch_step"])
                    self._watch_fence(self.store.get(job.id))  # falls back to the last checkpoint
            return Ack(fence=True, switch_step=new["switch_step"], fence_all_live=churn.fence_all_live(new),
                       fence_live_members=tuple(churn.live_members(new, job.assignments, a["stage"])),
                       fence_dropped=tuple(new.get("dropped") or ()))

    def _reconnected(self, job: Job) -> None:
        """The first report of a job after a coordinator restart: its nodes are back."""
        since = self._restarted.pop(job.id, None)
        if since is not None:
            self.store.add_event(job.id, "coordinator_reconnect", f"the job's nodes reconnected "
                                 f"{self.clock.time() - since:.1f} s after the coordinator restarted; reports made "
                                 "meanwhile are re-sent", after_s=round(self.clock.time() - since, 3))

    def rendezvous(self, job_id: str, node_id: str, stage: int, replica: int, maddrs: list[str],
                   attempt: int) -> list[str]:
        job, _ = self.assignment_of(job_id, node_id, stage=stage, replica=replica)
        if attempt != job.attempt:
            raise PermissionDeniedError(f"attempt {attempt} of job {job_id} is over (the job is at {job.attempt})")
        if len(maddrs) > 16 or any(len(m) > 300 for m in maddrs):
            raise InvalidRequestError("at most 16 multiaddrs of at most 300 characters")
        with self._lock:
            members = self._rendezvous.setdefault((job_id, attempt, stage), {})
            members[replica] = list(maddrs)
            return [m for r, ms in sorted(members.items()) for m in ms]

    # -- user side -------------------------------------------------------------------------------
