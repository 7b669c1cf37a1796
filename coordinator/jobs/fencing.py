"""The fence side of the job loop (:class:`Fencing`, a part of
:class:`coordinator.jobs.service.JobService`): a running job that lost a node of one of its
data-parallel pipelines, or that can grow back to its ``--replicas``, changes its plan through a
fence instead of a rollback. The protocol and its pure rules are in
:mod:`coordinator.jobs.churn`; this module applies them to the stored job:

- :meth:`Fencing._on_lost`: nodes of a running job are lost: a replica-loss fence over the whole
  pipelines, or a re-plan from the last complete checkpoint when none is whole or the attempt
  has not started yet (its start fence is open: no worker would reach a step boundary);
- :meth:`Fencing._maybe_grow`: idle nodes could hold more pipelines: a growth fence;
- :meth:`Fencing._watch_fence` / :meth:`Fencing._complete_fence`: once every live worker stopped
  at the switch step with its checkpoint, re-plan from it (a growth keeps the running pipelines in
  place, :meth:`Fencing._grown_plan`), naming for each worker where its state comes from (a live
  replica, peer to peer, or the coordinator's copy); a fence not done in ``FENCE_TIMEOUT_S``
  falls back to the last checkpoint; a fence whose live workers all finished the job instead
  (:func:`coordinator.jobs.churn.fence_outrun`) finishes it with their final checkpoints.

The host class provides ``store``, ``registry``, ``clock``, ``state_dir``, ``_grow_tried``,
``_plan``, ``_recover``, ``_stage_dirs`` and ``_full_checkpoints``.
"""

from __future__ import annotations

import logging

from swarm.errors import InfeasiblePlanError, SwarmError
from swarm.model.config import ModelConfig
from swarm.scheduling import Plan

from coordinator.jobs import churn, files
from coordinator.jobs.handover import state_copies
from coordinator.jobs.planning import JobPlan, busy_node_ids, grow_plan
from coordinator.jobs.spotchecks import verify_plans
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)

FENCE_TIMEOUT_S = 60.0  # a replica-loss fence not done by then falls back to the last checkpoint
GROW_RETRY_S = 15.0  # a job that could not grow back to --replicas tries again after this long
GROW_MIN_STEPS_LEFT = 10  # a job this close to its end finishes with the replicas it has


class Fencing:
    """Replica-loss and growth fences of running jobs (see the module docstring)."""

    def _maybe_grow(self, job: Job) -> None:
        """A job running with fewer pipelines than ``--replicas`` and idle nodes for more: open a
        growth fence (coordinator/jobs/churn.py); its re-plan adds them without rollback."""
        if not job.assignments or job.started_attempt != job.attempt:
            return  # not started yet: the start fence runs first
        now = self.clock.time()
        if now - self._grow_tried.get(job.id, -GROW_RETRY_S) < GROW_RETRY_S:
            return
        current = max(a["num_replicas"] for a in job.assignments)
        if job.spec.num_replicas <= current:
            return  # the common case, decided without listing every running job each tick
        stages = max(a["stage"] for a in job.assignments) + 1
        busy = busy_node_ids(self.store.list(states=("running",), limit=1000))
        idle = [n.id for n in self.registry.online() if n.id not in busy]
        target = churn.growth_target(current=current, requested=job.spec.num_replicas, stages=stages,
                                     idle_nodes=len(idle), batch_size=job.spec.batch_size,
                                     micro_batch_size=job.spec.micro_batch_size)
        if target is None:
            return
        self._grow_tried[job.id] = now
        steps = [w["step"] for w in self.store.per_worker(job.id)]
        if len(steps) < len(job.assignments) or job.total_steps - min(steps) <= GROW_MIN_STEPS_LEFT:
            return  # a worker has not reported yet, or the job is about to end
        try:
            jp = self._plan(job, degrade=True)
        except (InfeasiblePlanError, SwarmError) as exc:
            log.info("job cannot grow yet job=%s replicas=%d idle=%d reason=%s", job.id, current, len(idle), exc)
            return
        if jp.plan.d_dp <= current:
            return
        live = sorted({a["replica"] for a in job.assignments})
        fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live, lost=[], at_s=now,
                                 grow_to=jp.plan.d_dp)
        if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
            log.info("job grows job=%s replicas %d -> %d idle=%s", job.id, current, jp.plan.d_dp,
                     ",".join(n[:12] for n in idle))

    def _on_lost(self, job: Job, lost: dict[str, str]) -> None:
        """Nodes of a running job are lost: fence the surviving pipelines (no rollback) when one is
        whole and the job has several, else re-plan from the last complete checkpoint."""
        fence = job.fence
        known = set(fence["lost"]) if fence else set()
        for a in job.assignments:
            if a["node_id"] in lost and a["node_id"] not in known:
                what = f"node {a['node_id'][:12]} (stage {a['stage']}, replica {a['replica']}) is {lost[a['node_id']]}"
                self.store.add_event(job.id, "node_lost", what, node=a["node_id"], stage=a["stage"],
                                     replica=a["replica"], state=lost[a["node_id"]])
        live = churn.live_pipelines(job.assignments, set(lost))
        num_replicas = max(a["num_replicas"] for a in job.assignments)
        what = ", ".join(f"node {n[:12]} is {st}" for n, st in sorted(lost.items()))
        if num_replicas < 2 or not live or job.started_attempt < job.attempt:
            # an attempt whose start fence is still open ran no step: its live workers wait for
            # `start` and never reach a step boundary, so a replica-loss fence could only time out
            # (FENCE_TIMEOUT_S; bench/chaos.py saw 60 s without a commit); re-plan from its resume
            # point at once (the checkpoint it started from: nothing is rolled back)
            self._recover(job, what)
            return
        now = self.clock.time()
        if fence is None:
            fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live,
                                     lost=sorted(lost), at_s=now)
            if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
                dropped = sorted({a["replica"] for a in job.assignments} - set(live))
                self.store.add_event(job.id, "replica_dropped", f"replica(s) {dropped} dropped ({what}): "
                                     f"{len(live)} pipeline(s) carry on without rollback; they stop together at a "
                                     "step boundary and continue with the whole batch", dropped=dropped, live=live,
                                     attempt=job.attempt)
            return
        shrunk = churn.shrink_fence(fence, job.assignments, set(lost))
        if shrunk is not fence:
            self.store.set_fence(job.id, shrunk, expect_attempt=job.attempt)
        self._watch_fence(self.store.get(job.id))

    def _watch_fence(self, job: Job) -> None:
        fence = job.fence
        if fence is None or job.state != "running":
            return
        finals = {churn.key(c["stage"], c["replica"]) for c in self.store.checkpoints(job.id) if c["final"]}
        if churn.fence_outrun(fence, finals):
            log.info("fence outrun job=%s: the live replicas %s finished the job", job.id, fence["live"])
            self._finish(job, replicas=fence["live"])
        elif churn.fence_complete(fence):
            self._complete_fence(job)
        elif self.clock.time() - fence["opened_at"] > FENCE_TIMEOUT_S:
            self._recover(job, f"the surviving replicas did not stop together within {FENCE_TIMEOUT_S:.0f} s")

    def _complete_fence(self, job: Job) -> None:
        """Every live worker stopped at the switch step with its checkpoint uploaded: re-plan from it."""
        fence, step = job.fence, job.fence["switch_step"]
        jdir = files.job_dir(self.state_dir, job.id)
        try:
            jp = (self._grown_plan(job) if fence.get("grow_to") else None) or self._plan(job, degrade=True)
            _, has_optim = files.assemble_resume(jdir, ModelConfig.from_hf_config(job.model),
                                                 self._stage_dirs(job, step), step=step)
        except (InfeasiblePlanError, SwarmError) as exc:
            self._recover(job, f"cannot re-plan after the fence ({exc})")
            return
        optim = "with its optimizer state" if has_optim else "optimizer state restarts"
        sources, serves = churn.state_sources(old=job.assignments, new=jp.assignments,
                                              copies=state_copies(self.store.checkpoints(job.id),
                                                                  self._full_checkpoints(job).get(step, {}),
                                                                  step=step), step=step)
        for a, src, serve in zip(jp.assignments, sources, serves):
            # peer to peer, verified against the hashes of the copy (node/training/state_copy.py)
            a["state_source"], a["state_serves"] = src, serve
        nodes = len({a["node_id"] for a in jp.assignments})
        before = {a["node_id"] for a in job.assignments}
        added = sorted({a["node_id"] for a in jp.assignments} - before)
        grew = bool(fence.get("grow_to")) and jp.plan.d_dp > max(a["num_replicas"] for a in job.assignments)
        why = ("adding replica(s) on idle nodes" if grew else
               "a growth fence whose idle nodes left before the switch step" if fence.get("grow_to") else
               "losing replica(s)")
        for a in jp.assignments:  # replica_added is recorded when the attempt starts (handover.AddedReplicas)
            a["added"] = grew and a["node_id"] in added
        if self.store.replan(job.id, plan=jp.plan.to_json(), assignments=jp.assignments, attempt=job.attempt + 1,
                             resume_step=step, expect_attempt=job.attempt,
                             reason=f"re-planned without rollback after {why}: continuing at step "
                                    f"{step} ({optim})") is not None:
            self.store.add_event(job.id, "replan", f"re-planning (attempt {job.attempt + 1}) on {nodes} node(s): "
                                 f"{jp.plan.d_dp} replica(s) carry the whole batch from step {step}, no rollback",
                                 attempt=job.attempt + 1, resume_step=step, fence=True, num_replicas=jp.plan.d_dp)

    def _grown_plan(self, job: Job) -> JobPlan | None:
        """A growth fence's re-plan: the running pipelines as they are plus new ones on idle nodes
        (planning.grow_plan); None when that is not possible now (then the planner re-plans all)."""
        online = {n.id: n for n in self.registry.online()}
        if not job.plan or any(a["node_id"] not in online for a in job.assignments):
            return None
        plan = Plan.from_json(job.plan)
        busy = busy_node_ids(self.store.list(states=("running",), limit=1000))
        idle = [n for n in online.values() if n.id not in busy]
        target = churn.growth_target(current=plan.d_dp, requested=job.spec.num_replicas, stages=len(plan.stages),
                                     idle_nodes=len(idle), batch_size=job.spec.batch_size,
                                     micro_batch_size=job.spec.micro_batch_size)
        if target is None:
            return None
        try:
            jp = grow_plan(plan, idle, online, num_replicas=target, spec=job.spec)
        except InfeasiblePlanError as exc:
            log.info("job cannot grow in place job=%s (%s); re-planning it whole", job.id, exc)
            return None
        for a, v in zip(jp.assignments, verify_plans(jp.assignments, prob=job.spec.verify_prob)):
            a["verify"] = v
        jp.assignments[:] = churn.with_keepers(jp.assignments)
        return jp
