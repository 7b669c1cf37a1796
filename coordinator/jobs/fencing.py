"""The fence side of the job loop (:class:`Fencing`, a part of
:class:`coordinator.jobs.service.JobService`): a running job that lost a node of one of its
data-parallel pipelines, or that can grow back to its ``--replicas``, changes its plan through a
fence instead of a rollback. The protocol and its pure rules are in
:mod:`coordinator.jobs.churn`; this module applies them to the stored job:

- :meth:`Fencing._on_lost`: nodes of a running job are lost: a replica-loss fence over the whole
  pipelines, or a re-plan from the last complete checkpoint when none is whole or the attempt
  has not started yet (its start fence is open: no worker would reach a step boundary);
- :meth:`Fencing._maybe_grow`: idle nodes could hold more pipelines: a growth fence;
- :meth:`Fencing._maybe_help`: a job at its full ``--replicas`` and an idle node per pipeline: a
  helper fence, whose re-plan adds them as helper replicas of the slowest stage
  (coordinator/jobs/helpers.py; event ``replica_added`` with ``helper`` true);
- :meth:`Fencing._maybe_rebalance`: a node is seen far below its planned speed and re-planning
  with the seen speeds pays (coordinator/jobs/rebalance.py): a re-balance fence, whose re-plan
  moves the layer boundaries (job event ``rebalance``);
- :meth:`Fencing._maybe_absorb`: idle nodes too few for a whole pipeline (a volunteer that just
  joined) would make the step faster if the job were re-planned with them: the same re-balance
  fence, whose re-plan takes them in (event ``rebalance`` with ``cause`` "join");
- :meth:`Fencing._watch_fence` / :meth:`Fencing._complete_fence`: once every live worker stopped
  at the switch step with its checkpoint, re-plan from it (a growth keeps the running pipelines in
  place, :meth:`Fencing._grown_plan`), naming for each worker where its state comes from (a live
  replica, peer to peer, or the coordinator's copy); a fence not done in ``FENCE_TIMEOUT_S``
  falls back to the last checkpoint, and so does one a worker ran past (it should not happen:
  coordinator/jobs/churn.py); a fence whose live workers all finished the job instead
  (:func:`coordinator.jobs.churn.fence_outrun`) finishes it with their final checkpoints.

The host class provides ``store``, ``registry``, ``clock``, ``state_dir``, ``_grow_tried``,
``_absorb_tried``, ``_absorb_seen``,
``_plan``, ``_recover``, ``_stage_dirs``, ``_full_checkpoints``, ``speeds`` (a SpeedWatch),
``network``, ``_rebalance_tried`` and ``_probation`` (spot-check probation by node, for the grown plan).
"""

from __future__ import annotations

import logging

from swarm.errors import InfeasiblePlanError, SwarmError
from swarm.model.config import ModelConfig
from swarm.scheduling import Plan

from coordinator.jobs import churn, files, helpers, rebalance
from coordinator.jobs.handover import state_copies
from coordinator.jobs.planning import JobPlan, busy_node_ids, grow_plan, holds_stage, predicted_times
from coordinator.jobs.spotchecks import verify_plans
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)

FENCE_TIMEOUT_S = 60.0  # a replica-loss fence not done by then falls back to the last checkpoint
GROW_RETRY_S = 15.0  # a job that could not grow back to --replicas tries again after this long
GROW_MIN_STEPS_LEFT = 10  # a job this close to its end finishes with the replicas it has
HELP_RETRY_S = 5.0  # idle nodes a job could add as helpers are weighed at most this often
HELP_REWEIGH_S = 60.0  # ... and helpers found not to pay, again after this long (the step time may change)
ABSORB_RETRY_S = 5.0  # idle nodes a job could take in are weighed at most this often (the planner runs)


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

    def _maybe_help(self, job: Job) -> None:
        """A job at its full ``--replicas`` with an idle node per pipeline: open a helper fence
        whose re-plan adds them as helper replicas of its slowest stage (coordinator/jobs/helpers.py),
        each copying the stage's state from a live replica peer to peer, with no rollback."""
        if not self.helpers or not job.assignments or job.started_attempt != job.attempt or job.fence is not None:
            return  # (--no-helpers)
        pipelines = max(a["num_replicas"] for a in job.assignments)
        if pipelines < job.spec.num_replicas or helpers.has_helpers(job.assignments) or not job.plan:
            return  # (a job below its replicas grows whole pipelines back: _maybe_grow)
        now = self.clock.time()
        if now - self._help_tried.get(job.id, -HELP_RETRY_S) < HELP_RETRY_S:
            return
        self._help_tried[job.id] = now  # what follows reads the store and the registry
        busy = busy_node_ids(self.store.list(states=("running",), limit=1000))
        idle = [n for n in self.registry.online() if n.id not in busy]
        if len(idle) < pipelines or self.speeds.attempt_age_s(job) < rebalance.SETTLE_S:
            return  # too few for every pipeline, or the attempt's speeds are not its own yet
        job = self.store.get(job.id)  # a fence may have opened this tick (_maybe_grow)
        if job.state != "running" or job.fence is not None or job.started_attempt != job.attempt:
            return
        rows = self.store.per_worker(job.id)
        steps_left = job.total_steps - min((r["step"] for r in rows), default=0)
        seen = (job.attempt, frozenset(n.id for n in idle))
        last = self._help_seen.get(job.id)
        if last is not None and last[0] == seen and now - last[1] < HELP_REWEIGH_S:
            return  # found not to pay for this attempt and these idle nodes a moment ago
        stage = helpers.pick_stage(rows=rows, assignments=job.assignments, idle=len(idle),
                                   requested=job.spec.num_replicas, steps_left=steps_left,
                                   min_steps_left=GROW_MIN_STEPS_LEFT, resume_step=job.resume_step,
                                   micro_batches=job.spec.micro_batches(pipelines))
        step_s = self.speeds.step_s(job)
        if stage is None or not step_s:
            return
        plan = Plan.from_json(job.plan)
        fit = sorted((n for n in idle if holds_stage(n, plan, stage)), key=lambda n: (-n.planning_tflops, n.id))
        if len(fit) < pipelines:
            log.info("no helpers for job=%s: %d idle node(s) can hold stage %d, %d pipeline(s)", job.id, len(fit),
                     stage, pipelines)
            return
        chosen = fit[:pipelines]
        try:
            new_s = self._helped_step_s(job, plan, stage, chosen, step_s, rows)
        except SwarmError as exc:  # a node of the stage left the registry meanwhile (NotFoundError)
            log.info("cannot weigh helpers job=%s (%s)", job.id, exc)
            return
        gain = 1.0 - new_s / step_s
        log.info("helpers weighed job=%s stage=%d nodes=%s: step %.4g s -> %.4g s predicted (%.0f%%)", job.id, stage,
                 ",".join(n.id[:12] for n in chosen), step_s, new_s, 100 * gain)
        if gain < helpers.MIN_GAIN:
            self._help_seen[job.id] = (seen, now)
            return  # the all-reduce it adds costs about what halving the stage saves: leave the nodes idle
        live = sorted({helpers.pipeline_of(a) for a in job.assignments})
        fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live, lost=[], at_s=now,
                                 helpers={"stage": stage, "nodes": [n.id for n in chosen], "step_s": step_s,
                                          "predicted_step_s": new_s})
        if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
            log.info("job adds helpers job=%s stage=%d nodes=%s", job.id, stage, ",".join(n.id[:12] for n in chosen))

    def _helped_step_s(self, job: Job, plan: Plan, stage: int, chosen: list, step_s: float,
                       rows: list[dict]) -> float:
        """The step time predicted with ``chosen`` (one per pipeline) helping ``stage`` (helpers.py)."""
        st, last = plan.stages[stage], len(plan.stages) - 1
        params = helpers.stage_parameters(ModelConfig.from_hf_config(job.model), st.layers[0], st.layers[1],
                                          is_first=stage == 0, is_last=stage == last)
        holders = [self.registry.get(a["node_id"]) for a in job.assignments if a["stage"] == stage]
        nodes = holders + list(chosen)
        bandwidth = self.network.planning_matrix(nodes)[1]
        links = [float(bandwidth[i][j]) for i in range(len(holders)) for j in range(len(holders), len(nodes))]
        known = [b for b in links if b == b and b > 0]
        return helpers.predicted_step_s(compute_s=helpers.compute_per_step(rows, job.resume_step), step_s=step_s,
                                        stage=stage, pipelines=len(holders), gradient_bytes=2.0 * params,
                                        bandwidth_Bps=min(known) if known else float("nan"))

    def _maybe_rebalance(self, job: Job) -> None:
        """A node of the running attempt is seen slow: weigh re-planning with the seen speeds
        (coordinator/jobs/rebalance.py :func:`~coordinator.jobs.rebalance.decide`) and, when it
        pays, open a re-balance fence. Weighed at most once per ``rebalance.RETRY_S`` per job
        (each time runs the planner). ``job`` may be stale (the loop's copy): it is read again only
        when a node of it is slow."""
        if not self.rebalance or not self.speeds.slow_now(job) or helpers.has_helpers(job.assignments):
            return  # (a re-balance re-plans whole pipelines: it would drop the helpers it should weigh)
        job = self.store.get(job.id)  # the fence or attempt may have changed this tick (_maybe_grow)
        if (not job.assignments or job.state != "running"
                or job.started_attempt != job.attempt or job.fence is not None):
            return
        slow = self.speeds.slow_now(job)
        now = self.clock.time()
        if not slow or now - self._rebalance_tried.get(job.id, -rebalance.RETRY_S) < rebalance.RETRY_S:
            return
        self._rebalance_tried[job.id] = now
        seen, rel = self.speeds.seen(job)
        node = min(slow, key=lambda n: (rel.get(n, 1.0), n))  # the slowest; ties by id
        steps = [w["step"] for w in self.store.per_worker(job.id)]
        if not job.plan or node not in seen or len(steps) < len(job.assignments):
            return
        try:
            jp = self._plan(job, degrade=True, tflops=seen)
            current_s, new_s = rebalance.calibrated(measured_step_s=self.speeds.step_s(job),
                                                    current=self._predicted(job, Plan.from_json(job.plan), seen),
                                                    new=self._predicted(job, jp.plan, seen))
        except (InfeasiblePlanError, SwarmError) as exc:
            log.info("cannot weigh a re-balance job=%s node=%s (%s)", job.id, node[:12], exc)
            return
        cand = rebalance.Candidate(node_id=node, seen_ratio=rel.get(node, 1.0), seen_tflops=seen[node],
                                   current_step_s=current_s, new_step_s=new_s,
                                   steps_left=job.total_steps - min(steps), attempt_age_s=self.speeds.attempt_age_s(job),
                                   now_s=now)
        decision = rebalance.decide(cand, rebalance.history(self.store.events(job.id)))
        log.info("re-balance weighed job=%s node=%s go=%s: %s", job.id, node[:12], decision.go, decision.why)
        if not decision.go:
            return
        planned = seen[node] / max(1e-12, min(1.0, rel.get(node, 1.0)))
        info = {"node": node, "seen_planned_ratio": round(cand.seen_ratio, 4), "seen_tflops": seen[node],
                "planned_tflops": planned, "predicted_gain": round(decision.gain, 4), "current_step_s": current_s,
                "new_step_s": new_s, "tflops": seen, "layers_before": rebalance.layers_of(job.assignments, node),
                "decided_at": now}
        live = sorted({a["replica"] for a in job.assignments})
        fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live, lost=[], at_s=now,
                                 rebalance=info)
        if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
            log.info("job re-balances job=%s around node=%s (%s)", job.id, node[:12], decision.why)

    def _maybe_absorb(self, job: Job) -> None:
        """Idle nodes the job could use, though not as whole new pipelines (a single volunteer that
        joined, say): weigh re-planning the running job with them (the planner may move layers to
        a newcomer, or swap one in for a slower node) under the speeds as seen, and, when the
        predicted step time drops enough (:func:`coordinator.jobs.rebalance.decide`), open a
        re-balance fence whose re-plan takes them in: the newcomer loads its layers' weights and
        optimizer state from the checkpoint at the switch step, peer to peer and verified by hash,
        and no step is redone. Weighed once per change of the idle set (each time runs the planner),
        at most once per ABSORB_RETRY_S per job."""
        if not self.rebalance or not job.assignments or job.started_attempt != job.attempt or job.fence is not None:
            return
        if self.speeds.attempt_age_s(job) < rebalance.SETTLE_S:
            return  # the attempt's speeds are not its own yet
        now = self.clock.time()
        if now - self._absorb_tried.get(job.id, -ABSORB_RETRY_S) < ABSORB_RETRY_S:
            return
        self._absorb_tried[job.id] = now  # what follows reads the store: at most once per ABSORB_RETRY_S
        busy = busy_node_ids(self.store.list(states=("running",), limit=1000))
        idle = frozenset(n.id for n in self.registry.online() if n.id not in busy)
        if not idle or self._absorb_seen.get(job.id) == (job.attempt, idle):
            return
        pipelines = max(a["num_replicas"] for a in job.assignments)
        if helpers.has_helpers(job.assignments):
            return  # the planner re-plans whole pipelines: it would drop the job's helpers
        if (self.helpers and len(idle) >= pipelines and pipelines >= job.spec.num_replicas
                and len({a["stage"] for a in job.assignments}) > 1):
            return  # they can join as helpers of the slowest stage instead (_maybe_help): no layer moves
        job = self.store.get(job.id)  # a fence may have opened this tick (_maybe_grow, _maybe_rebalance)
        if job.state != "running" or job.fence is not None or job.started_attempt != job.attempt:
            return
        steps = [w["step"] for w in self.store.per_worker(job.id)]
        if len(steps) < len(job.assignments):
            return  # a worker has not reported yet
        self._absorb_seen[job.id] = (job.attempt, idle)
        seen, _ = self.speeds.seen(job)
        try:
            jp = self._plan(job, degrade=True, tflops=seen or None)
            newcomers = sorted({a["node_id"] for a in jp.assignments} & idle)
            if not newcomers or not job.plan:
                log.info("idle node(s) not taken in job=%s: the planner would not use %s", job.id,
                         ",".join(n[:12] for n in sorted(idle)))
                return
            current_s, new_s = rebalance.calibrated(measured_step_s=self.speeds.step_s(job),
                                                    current=self._predicted(job, Plan.from_json(job.plan), seen),
                                                    new=self._predicted(job, jp.plan, seen))
            node = newcomers[0]
            speed = self.registry.get(node).planning_tflops  # (gone meanwhile: NotFoundError, a SwarmError)
        except (InfeasiblePlanError, SwarmError) as exc:
            log.info("cannot weigh taking in idle nodes job=%s (%s)", job.id, exc)
            return
        cand = rebalance.Candidate(node_id=node, seen_ratio=1.0, seen_tflops=speed, current_step_s=current_s,
                                   new_step_s=new_s, steps_left=job.total_steps - min(steps),
                                   attempt_age_s=self.speeds.attempt_age_s(job), now_s=now)
        decision = rebalance.decide(cand, rebalance.history(self.store.events(job.id)))
        log.info("taking in idle node(s) weighed job=%s nodes=%s go=%s: %s (seen %s; split %s)", job.id,
                 ",".join(n[:12] for n in newcomers), decision.go, decision.why,
                 {n[:8]: round(v, 6) for n, v in seen.items()},
                 [(a["node_id"][:8], a["last_layer_excl"] - a["first_layer"]) for a in jp.assignments])
        if not decision.go:
            return
        info = {"cause": "join", "node": node, "joined": newcomers, "seen_planned_ratio": 1.0, "seen_tflops": speed,
                "planned_tflops": speed, "predicted_gain": round(decision.gain, 4), "current_step_s": current_s,
                "new_step_s": new_s, "tflops": dict(seen), "layers_before": 0, "decided_at": now}
        live = sorted({a["replica"] for a in job.assignments})
        fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live, lost=[], at_s=now,
                                 rebalance=info)
        if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
            log.info("job takes in idle node(s) job=%s nodes=%s (%s)", job.id, ",".join(n[:12] for n in newcomers),
                     decision.why)

    def _predicted(self, job: Job, plan: Plan, tflops: dict[str, float]) -> tuple[float, float]:
        nodes = self.registry.online()
        delay, bandwidth = self.network.planning_matrix(nodes)[:2]
        return predicted_times(plan, spec=job.spec, config=ModelConfig.from_hf_config(job.model), nodes=nodes,
                                delay_s=delay, bandwidth_Bps=bandwidth, tflops=tflops)

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
        dropped = churn.holder_loss(job.assignments, set(lost)) if job.started_attempt >= job.attempt else None
        if dropped and (fence is None or set(lost) <= {d["node"] for d in fence.get("dropped") or ()}):
            self._on_lost_holder(job, dropped, what)
            return
        if num_replicas < 2 or not live or job.started_attempt < job.attempt:
            # an attempt whose start fence is still open ran no step: its live workers wait for
            # `start` and never reach a step boundary, so a replica-loss fence could only time out
            # (FENCE_TIMEOUT_S; bench/chaos.py saw 60 s without a commit); re-plan from its resume
            # point at once (the checkpoint it started from: nothing is rolled back)
            self._recover(job, what, cause="not_started" if num_replicas >= 2 and live else "stage_lost")
            return
        now = self.clock.time()
        if fence is None:
            fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live,
                                     lost=sorted(lost), at_s=now)
            if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
                dropped = sorted({helpers.pipeline_of(a) for a in job.assignments} - set(live))
                self.store.add_event(job.id, "replica_dropped", f"replica(s) {dropped} dropped ({what}): "
                                     f"{len(live)} pipeline(s) carry on without rollback; they stop together at a "
                                     "step boundary and continue with the whole batch", dropped=dropped, live=live,
                                     attempt=job.attempt)
            return
        shrunk = churn.shrink_fence(fence, job.assignments, set(lost))
        if shrunk is not fence:
            self.store.set_fence(job.id, shrunk, expect_attempt=job.attempt)
        self._watch_fence(self.store.get(job.id))

    def _on_lost_holder(self, job: Job, dropped: list[dict], what: str) -> None:
        """A one-pipeline job lost a holder of a shared stage whose other holder lives
        (churn.holder_loss): a holder-loss fence over the pipeline, no rollback."""
        if job.fence is not None:
            self._watch_fence(job)
            return
        live = sorted({helpers.pipeline_of(a) for a in job.assignments})
        fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=live,
                                 lost=sorted(d["node"] for d in dropped), at_s=self.clock.time(), dropped=dropped)
        if self.store.set_fence(job.id, fence, expect_attempt=job.attempt):
            stages = sorted({d["stage"] for d in dropped})
            self.store.add_event(job.id, "replica_dropped", f"helper replica(s) of stage(s) {stages} dropped ({what}): "
                                 "the pipeline carries on without rollback; the micro-batches they held in the step in "
                                 "flight are dropped, and the stage's other holder takes the whole share from the "
                                 "next re-plan", dropped=[], live=live, attempt=job.attempt, helper=True, stages=stages,
                                 nodes=[d["node"] for d in dropped])

    def _watch_fence(self, job: Job) -> None:
        fence = job.fence
        if fence is None or job.state != "running":
            return
        finals = {churn.key(c["stage"], c["replica"]) for c in self.store.checkpoints(job.id) if c["final"]}
        if churn.fence_outrun(fence, finals):
            log.info("fence outrun job=%s: the live replicas %s finished the job", job.id, fence["live"])
            self._finish(job, replicas=fence["live"])
        elif churn.fence_overrun(fence):
            # a worker past the switch step: its checkpoint at S would hold later weights
            self._recover(job, f"worker(s) {fence['overrun']} ran past the fence's switch step "
                          f"{fence['switch_step']}", cause="fence_overrun")
        elif churn.fence_complete(fence):
            self._complete_fence(job)
        elif self.clock.time() - fence["opened_at"] > FENCE_TIMEOUT_S:
            self._recover(job, f"the surviving replicas did not stop together within {FENCE_TIMEOUT_S:.0f} s",
                          cause="fence_timeout")

    def _complete_fence(self, job: Job) -> None:
        """Every live worker stopped at the switch step with its checkpoint uploaded: re-plan from it."""
        fence, step = job.fence, job.fence["switch_step"]
        jdir = files.job_dir(self.state_dir, job.id)
        try:
            rb = fence.get("rebalance") or None
            jp = ((self._grown_plan(job) if fence.get("grow_to") else None)
                  or (self._helped_plan(job, fence["helpers"]) if fence.get("helpers") else None)
                  or self._plan(job, degrade=True, tflops=rb["tflops"] if rb else None))
            _, has_optim = files.assemble_resume(jdir, ModelConfig.from_hf_config(job.model),
                                                 self._stage_dirs(job, step), step=step)
        except (InfeasiblePlanError, SwarmError) as exc:
            self._recover(job, f"cannot re-plan after the fence ({exc})", cause="fence_replan_failed")
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
        helped = bool(fence.get("helpers")) and helpers.has_helpers(jp.assignments)
        why = (f"taking in idle node(s) {', '.join(n[:12] for n in rb['joined'])}" if rb and rb.get("joined") else
               f"adding helper replica(s) of stage {fence['helpers']['stage']} on idle node(s)" if helped else
               f"re-balancing the layers around slow node {rb['node'][:12]}" if rb else
               "adding replica(s) on idle nodes" if grew else
               "a growth fence whose idle nodes left before the switch step" if fence.get("grow_to") else
               "losing helper replica(s)" if fence.get("dropped") else
               "losing replica(s)")
        for a in jp.assignments:  # replica_added is recorded when the attempt starts (handover.AddedReplicas)
            a["added"] = (grew or helped) and a["node_id"] in added
        if self.store.replan(job.id, plan=jp.plan.to_json(), assignments=jp.assignments, attempt=job.attempt + 1,
                             resume_step=step, expect_attempt=job.attempt,
                             reason=f"re-planned without rollback after {why}: continuing at step "
                                    f"{step} ({optim})") is not None:
            h = fence.get("helpers") if helped else None
            self.store.add_event(job.id, "replan", f"re-planning (attempt {job.attempt + 1}) on {nodes} node(s): "
                                 f"{jp.plan.d_dp} replica(s) carry the whole batch from step {step}, no rollback"
                                 + (f"; helpers at stage {h['stage']}: step {h['step_s']:.3g} s -> "
                                    f"{h['predicted_step_s']:.3g} s predicted" if h and h.get("step_s") else ""),
                                 attempt=job.attempt + 1, resume_step=step, fence=True, num_replicas=jp.plan.d_dp,
                                 **({"helper_stage": h["stage"], "step_s_before": h.get("step_s"),
                                     "predicted_step_s": h.get("predicted_step_s")} if h else {}))
            if rb:
                self._rebalanced(job, rb, jp, step)

    def _rebalanced(self, job: Job, rb: dict, jp: JobPlan, step: int) -> None:
        after = rebalance.layers_of(jp.assignments, rb["node"])
        split = lambda asg: [a["last_layer_excl"] - a["first_layer"] for a in sorted(  # noqa: E731
            (a for a in asg if a["replica"] == 0), key=lambda a: a["stage"])]
        gone = sorted({a["node_id"] for a in job.assignments} - {a["node_id"] for a in jp.assignments})
        what = (f"took in idle node {rb['node'][:12]}" + (f" (and {len(rb['joined']) - 1} more)" if len(rb["joined"]) > 1
                                                        else "")
                + (f" in place of {', '.join(n[:12] for n in gone)}" if gone else "")
                if rb.get("cause") == "join" else
                f"re-balanced the layers around node {rb['node'][:12]}, seen at {rb['seen_planned_ratio']:.2f}x its "
                "planned speed")
        self.store.add_event(
            job.id, "rebalance", f"{what}: it holds {after} layer(s) instead of "
            f"{rb['layers_before']} (split {split(job.assignments)} -> {split(jp.assignments)}), predicted step "
            f"{rb['current_step_s']:.3g} s -> {rb['new_step_s']:.3g} s ({rb['predicted_gain']:.0%} faster); "
            f"continuing at step {step}, no rollback", cause=rb.get("cause", "slow"), joined=rb.get("joined", []),
            node=rb["node"], seen_planned_ratio=rb["seen_planned_ratio"],
            seen_tflops=rb["seen_tflops"], planned_tflops=rb["planned_tflops"], predicted_gain=rb["predicted_gain"],
            resume_step=step, rollback=False, layers_before=rb["layers_before"], layers_after=after,
            split_before=split(job.assignments), split_after=split(jp.assignments), decided_at=rb["decided_at"],
            attempt=job.attempt + 1)

    def _helped_plan(self, job: Job, fence_helpers: dict) -> JobPlan | None:
        """A helper fence's re-plan: every worker in place, the fence's idle nodes added as helpers
        of its stage, one per pipeline (coordinator/jobs/helpers.py); None when a node of it is
        gone (then the planner re-plans all)."""
        online = {n.id: n for n in self.registry.online()}
        nodes = list(fence_helpers.get("nodes") or [])
        live = sorted({helpers.pipeline_of(a) for a in job.assignments})
        if not job.plan or len(nodes) != len(live) or any(
                n not in online for n in nodes + [a["node_id"] for a in job.assignments]):
            return None
        asg = helpers.with_helpers(job.assignments, stage=int(fence_helpers["stage"]), helpers={
            r: {"node_id": n, "address": online[n].peer_address} for r, n in zip(live, nodes)})
        for a, v in zip(asg, verify_plans(asg, prob=job.spec.verify_prob, probation=self._probation.get(job.id))):
            a["verify"] = v
        return JobPlan(plan=Plan.from_json(job.plan), assignments=churn.with_keepers(asg))

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
        for a, v in zip(jp.assignments, verify_plans(jp.assignments, prob=job.spec.verify_prob,
                                                     probation=self._probation.get(job.id))):
            a["verify"] = v
        jp.assignments[:] = churn.with_keepers(jp.assignments)
        return jp
