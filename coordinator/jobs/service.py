"""The coordinator's training-job logic: submit, plan, assign, watch, collect, export.

:class:`JobService` holds no protobuf (the servicer in :mod:`coordinator.jobs.servicer`
translates). Its loop (:meth:`tick`, every ``tick_interval_s``) plans pending jobs over idle
online nodes, recovers running jobs whose nodes were lost (a fence and a re-plan without
rollback while a whole pipeline survives, else a re-plan from the last complete checkpoint, or a
wait for nodes), and assembles the result of jobs whose every stage delivered its final
checkpoint. The fences are applied in :mod:`coordinator.jobs.fencing`; their rules are in
:mod:`coordinator.jobs.churn`. Checkpoints (receiving, completeness, keepers, export, resume) are
in :mod:`coordinator.jobs.checkpointing`; workers' assignments, reports and rendezvous in
:mod:`coordinator.jobs.reports`; the records the CLI and the page show in :mod:`coordinator.jobs.details`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path

from swarm.clock import Clock
from swarm.errors import InfeasiblePlanError, InvalidRequestError, NotFoundError, SwarmError
from swarm.job_spec import MAX_STEPS, JobSpec
from coordinator.jobs.speedwatch import SpeedWatch
from swarm.model.config import ModelConfig
from swarm.pipeline.data import BatchOrder
from swarm.transport.transfer import receive_files

from coordinator.jobs import churn, files, keepers
from coordinator.jobs.checkpointing import Checkpointing
from coordinator.jobs.details import Details
from coordinator.jobs.disputing import Disputing
from coordinator.jobs.fencing import Fencing
from coordinator.jobs.reports import Reporting
from coordinator.jobs.handover import AddedReplicas
from coordinator.jobs.planning import (JobPlan, busy_node_ids, check_layers, check_shape, nodes_needed, plan_job,
                                      separate)
from coordinator.jobs.spotchecks import Judge, Verdict, checks_clause, verify_plans
from coordinator.jobs.store import Job, JobStore

log = logging.getLogger(__name__)

MAX_REPLANS = 3  # a job re-planned from a checkpoint this often after losing nodes fails instead
PEER_FAILURE_GRACE_S = 10.0  # a worker that lost its neighbour, with no node lost this long: re-plan



class JobService(Checkpointing, Reporting, Fencing, Disputing, Details):
    """Thread-safe. ``state_dir`` holds the job files; ``registry``/``network`` are the app's."""

    def __init__(self, *, store: JobStore, state_dir: Path, registry, network, clock: Clock,
                 limits: files.UploadLimits | None = None, tick_interval_s: float = 0.5,
                 rebalance: bool = True, helpers: bool = True) -> None:
        """``rebalance``: move a job's layers around a node seen slow (coordinator/jobs/rebalance.py);
        False: only report it (``slow_node``). ``helpers``: add idle nodes to running jobs as helpers
        of their slowest stage (coordinator/jobs/helpers.py)."""
        self.store = store
        self.rebalance = rebalance
        self.helpers = helpers
        self.state_dir = Path(state_dir)
        self.registry = registry
        self.network = network
        self.clock = clock
        self.limits = limits or files.UploadLimits()
        self.tick_interval_s = tick_interval_s
        self._lock = threading.RLock()
        self._rendezvous: dict[tuple[str, int, int], dict[int, list[str]]] = {}
        self._stop = threading.Event()
        self._logged: set[tuple[str, str]] = set()  # (job, error) the loop already logged with its traceback
        self._resumed: set[tuple[str, int]] = set()  # (job, attempt) whose "resumed" event was recorded
        self._kept_seen: dict[tuple[str, str], int] = {}  # (job, keeper node) -> the kept_step it last reported
        # (job, attempt) -> nodes whose worker of it set up again after running steps: the node
        # restarted (killed and back before it was noticed lost) and lost that worker's state
        self._restarted_nodes: dict[tuple[str, int], set[str]] = {}
        self._ready: dict[tuple[str, int], set[str]] = {}  # (job, attempt) -> "stage:replica" ready to start
        self._peer_failed: dict[tuple[str, int], tuple[float, str]] = {}  # (job, attempt) -> (when, what)
        self._restarted: dict[str, float] = {}  # running job -> when this coordinator started (not heard since)
        self._replans: dict[str, int] = {}  # job -> re-plans from a checkpoint (fences excluded)
        self._thread: threading.Thread | None = None
        self.judge = Judge()  # spot checks and blame (coordinator/jobs/spotchecks.py)
        self._first_bad: dict[str, int] = {}  # job id -> first step a spot check found wrong
        # job id -> pairs of nodes (accuser, accused of a disputed check) its plans keep on different
        # stages, so each is checked by, and checks, someone else (coordinator/jobs/spotchecks.py)
        self._apart: dict[str, set[frozenset[str]]] = {}
        self._probation: dict[str, dict[str, int]] = {}  # job id -> accused node -> checked closely until this step
        self._grow_tried: dict[str, float] = {}  # job id -> when it last tried to grow back to --replicas
        self._rebalance_tried: dict[str, float] = {}  # job id -> when it last weighed a re-balance
        self._absorb_tried: dict[str, float] = {}  # job id -> when it last weighed taking in idle nodes
        self._help_tried: dict[str, float] = {}  # job id -> when it last weighed adding helpers (fencing.py)
        self._help_seen: dict[str, tuple] = {}  # job id -> (attempt, idle nodes) helpers were found not to pay for
        self._absorb_seen: dict[str, tuple] = {}  # job id -> (attempt, the idle node ids it weighed)
        self.added = AddedReplicas(store)  # replica_added events, once the grown attempt starts (handover.py)
        self.speeds = SpeedWatch(store=store, registry=registry, clock=clock)  # neighbours' view (speed.py)

    # -- loop ----------------------------------------------------------------------------------
    def start(self) -> None:
        now = self.clock.time()
        for job in self.store.list(states=("running",), limit=1000):
            # running at start: the previous coordinator process ended under it (crash, restart)
            self._restarted[job.id] = now
            self.store.add_event(job.id, "coordinator_restart", "the coordinator restarted; the job's nodes keep "
                                 "training and have a grace period to reconnect", attempt=job.attempt)
        for job in self.store.list(states=("running", "pending"), limit=1000):
            self._restore_disputes(job)
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 -- the loop must outlive one bad tick
                log.exception("job loop tick failed")

    def tick(self) -> None:
        """Watch running jobs, then plan pending ones (oldest first). One job whose handling raises
        something unexpected never blocks the others: it is logged once and, while pending, failed
        with the error (a running job is retried next tick)."""
        with self._lock:
            for job in self.store.list(states=("running",), limit=1000):
                self._guarded(job, self._watch)
            for job in sorted(self.store.list(states=("pending",), limit=1000), key=lambda j: j.created_at_s):
                self._guarded(job, self._try_plan)

    def _guarded(self, job: Job, step) -> None:
        try:
            step(job)
        except Exception as exc:  # noqa: BLE001 -- one job's bug must not stop the loop for the others
            what = f"{type(exc).__name__}: {exc}"
            if (job.id, what) not in self._logged:
                self._logged.add((job.id, what))
                log.exception("job loop failed on job=%s state=%s", job.id, job.state)
            if job.state == "pending":
                reason = f"planning failed unexpectedly ({what[:300]}); this is a bug, please report it"
                if self.store.transition(job.id, "failed", reason=reason, expect="pending") is not None:
                    self.store.add_event(job.id, "plan_error", reason, error=what[:300])

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, items) -> Job:
        """``items``: the upload as :class:`~swarm.transport.transfer.FileHeader` and ``bytes`` items, in order."""
        self._check_online(spec)
        job_id = uuid.uuid4().hex[:12]
        jdir = files.job_dir(self.state_dir, job_id)
        try:
            receive_files(items, jdir / "upload", limits=self.limits, roots=("data", "checkpoint"))
            prepared = files.prepare_job(jdir, seq_len=spec.seq_len, seed=spec.seed,
                                         max_model_params=self.limits.max_model_params)
            check_layers(spec, prepared.config)
            order = BatchOrder(num_samples=prepared.dataset.num_samples, batch_size=spec.batch_size,
                               micro_batch_size=spec.micro_batch_size, seed=spec.seed)
            total = spec.steps or order.steps_for_epochs(spec.epochs)
            if total > MAX_STEPS:
                raise InvalidRequestError(f"--epochs {spec.epochs:g} make {total} steps (limit {MAX_STEPS}); "
                                          "use fewer epochs or a larger --batch-size")
        except BaseException:
            shutil.rmtree(jdir, ignore_errors=True)
            raise
        job = self.store.create(job_id=job_id, spec=spec, model=prepared.config.to_hf_config(),
                                num_samples=prepared.dataset.num_samples, dataset_key=prepared.dataset.key,
                                total_steps=total)
        self.store.add_event(job.id, "submitted", f"submitted: {total} steps", total_steps=total)
        self.tick()
        return self.store.get(job.id)

    def _check_online(self, spec: JobSpec) -> None:
        """Refuse a fixed shape the swarm cannot hold even when every online node is free (the job
        would wait forever); InvalidRequestError naming the flag. An empty swarm is let through:
        the job waits for nodes to join."""
        online = len(self.registry.online())
        if online and online < nodes_needed(spec):
            try:
                check_shape(spec, None, num_nodes=online, where="online")
            except InfeasiblePlanError as exc:
                raise InvalidRequestError(str(exc)) from None

    def _plan(self, job: Job, *, degrade: bool = False, tflops: dict[str, float] | None = None,
              leave_out: frozenset[str] = frozenset()) -> JobPlan:
        """Plan ``job`` over the online nodes no other running job holds (its own count as free:
        a running job being re-planned gives its nodes back). ``degrade``: a job that already ran
        may fall back to fewer data-parallel replicas than ``--replicas`` when the nodes for all
        of them are missing (the global batch stays the same). Each assignment gets its
        spot-check plan (coordinator/jobs/spotchecks.py). ``tflops``: speeds to plan with instead
        of the nodes' (a re-balance). ``leave_out``: nodes not to use (the accuser of a disputed
        check that no plan can put on another stage than the accused). Raises InfeasiblePlanError."""
        others = [j for j in self.store.list(states=("running",), limit=1000) if j.id != job.id]
        busy = busy_node_ids(others) | leave_out
        nodes = [n for n in self.registry.online() if n.id not in busy]
        matrix = self.network.planning_matrix(nodes)  # relayed links within their relay's cap (docs/nat.md)
        spec = job.spec
        apart = self._apart.get(job.id, set())
        counts = churn.replica_counts(spec.num_replicas, spec.batch_size, spec.micro_batch_size) \
            if degrade and spec.num_replicas > 1 else [spec.num_replicas]
        for i, k in enumerate(counts):
            try:
                # both ends of a dispute stay in the job (each is to be checked by someone else)
                jp = plan_job(spec=spec.replace(num_replicas=k), config=ModelConfig.from_hf_config(job.model),
                              nodes=nodes, delay_s=matrix[0], bandwidth_Bps=matrix[1], seed=spec.seed, tflops=tflops,
                              prefer=frozenset().union(*apart) - leave_out)
                break
            except InfeasiblePlanError:
                if i == len(counts) - 1:
                    raise
        else:
            raise AssertionError("replica_counts always holds the requested count")
        if apart:
            jp = separate(jp, apart, {n.id: n for n in nodes}) or jp  # else conflicts() names the pairs left
        for a, v in zip(jp.assignments, verify_plans(jp.assignments, prob=spec.verify_prob,
                                                     probation=self._probation.get(job.id))):
            a["verify"] = v
        jp.assignments[:] = churn.with_keepers(jp.assignments)  # a second copy of each checkpoint
        return jp

    def _try_plan(self, job: Job) -> None:
        waited = job.waiting_since_s is not None
        try:
            jp = self._plan(job, degrade=True) if waited else self._plan(job)
            if waited and (jp := self._parted_after_wait(job, jp)) is None:
                return  # an accused node no plan can give another checker was quarantined: plan again
            resume_dir = files.job_dir(self.state_dir, job.id) / f"resume-{job.resume_step}"
            if job.resume_step > 0 and (resume_dir / keepers.INCOMPLETE).is_file():  # a copy was lost: keepers
                lost = keepers.lost_copies(self.store.checkpoints(job.id),
                                           self._full_checkpoints(job).get(job.resume_step, {}), step=job.resume_step)
                self._from_keepers(jp.assignments, lost, step=job.resume_step)
        except InfeasiblePlanError as exc:
            if waited and self.clock.time() - job.waiting_since_s > job.spec.node_wait_s:
                self._fail(job, f"lost a stage and no node could take it over within {job.spec.node_wait_s:g} s "
                                f"(--node-wait-s) ({exc}); {self._checkpoint_note(job.id)}")
                return
            reason = f"waiting: {exc}"
            if waited:
                reason = (f"waiting for a node to come back or join (lost a stage; resumes from step "
                          f"{job.resume_step} when it can; fails after --node-wait-s {job.spec.node_wait_s:g} s): {exc}")
            if job.reason != reason:
                self.store.set_reason(job.id, reason)
                log.info("job cannot be planned yet job=%s reason=%s", job.id, exc)
            return
        except InvalidRequestError as exc:  # e.g. --stages above the layers of a job stored before the check
            self._fail(job, f"cannot be planned: {exc}")
            return
        moved = self.store.transition(job.id, "running", expect="pending", plan=jp.plan.to_json(),
                                      assignments=jp.assignments, attempt=job.attempt + 1)
        if moved is not None and waited:
            self.store.add_event(job.id, "replan", f"re-planning (attempt {job.attempt + 1}) on "
                                 f"{len({a['node_id'] for a in jp.assignments})} node(s) after waiting: resuming from "
                                 f"step {job.resume_step}", attempt=job.attempt + 1, resume_step=job.resume_step,
                                 waited=True)
        elif moved is not None:
            nodes = {a["node_id"] for a in jp.assignments}
            checked, checks = checks_clause(num_replicas=jp.plan.d_dp, prob=job.spec.verify_prob,
                                            error_feedback=job.spec.codec.error_feedback)
            self.store.add_event(job.id, "planned", f"planned: {jp.plan.d_pp} stage(s) x {jp.plan.d_dp} replica(s) on "
                                 f"{len(nodes)} node(s)" + (f", starting at step {job.resume_step}" if job.resume_step
                                                            else "") + f"; {checks}",
                                 attempt=job.attempt + 1, num_stages=jp.plan.d_pp, num_replicas=jp.plan.d_dp,
                                 num_nodes=len(nodes), checked=checked)

    def _watch(self, job: Job) -> None:
        verdicts, dispute = self.judge.resolve_blames(job.id, self.clock.time(), grace_s=job.spec.peer_timeout_s,
                                                      is_online=self._is_online, attempt=job.attempt)
        for v in verdicts:
            self._quarantine(job, v)
        if dispute and not verdicts:
            self._recover(job, "two stages blame each other for stopping", cause="peer_failure")
            return
        disputes = self.judge.take_disputes(job.id)
        if disputes and self._disputed(job, disputes):
            return
        lost: dict[str, str] = {}
        for a in job.assignments:
            try:
                state = self.registry.get(a["node_id"]).state
            except NotFoundError:
                state = "lost"
            if state != "online":
                lost[a["node_id"]] = state
        for node_id in self._restarted_nodes.get((job.id, job.attempt), ()):
            lost.setdefault(node_id, "restarted")
        if lost and job.id in self._first_bad and any(st == "quarantined" for st in lost.values()):
            # a node computed something wrong: every replica may hold its effect (averaged
            # gradients), so roll back to before the first bad step instead of fencing the survivors
            self._recover(job, ", ".join(f"node {n[:12]} is {st}" for n, st in sorted(lost.items())),
                          cause="wrong_result")
            return
        if lost:
            self._on_lost(job, lost)
            return
        if job.fence is not None:
            self._watch_fence(job)
            return
        failed = self._peer_failed.get((job.id, job.attempt))
        # a blamed neighbour is weighed first (Judge.resolve_blames): it may be a staller to quarantine
        if failed and self.clock.time() - failed[0] > PEER_FAILURE_GRACE_S and not self.judge.has_blames(job.id):
            # a worker lost its neighbour but no node is lost: a broken link, a crashed worker
            self._recover(job, failed[1], cause="peer_failure")
            return
        # from the store, not memory: a coordinator restarted mid-job still sees the stages that finished
        done = {(c["stage"], c["replica"]) for c in self.store.checkpoints(job.id) if c["final"]}
        need = {(a["stage"], a["replica"]) for a in job.assignments}
        if need and need <= done:
            self._finish(job)
            return
        self._maybe_grow(job)
        self._maybe_help(job)
        self._maybe_rebalance(job)
        self._maybe_absorb(job)

    def _recover(self, job: Job, what: str, *, cause: str, plan: JobPlan | None = None) -> None:
        """Re-plan a running job that lost a stage over the idle online nodes, resuming after its
        last complete checkpoint; with no nodes for it, wait for some (pending, with the reason)
        for up to ``--node-wait-s``; fail it (keeping the checkpoints) after too many re-plans in a
        row without progress or when it may not wait."""
        # before the first step a spot check found wrong: a checkpoint k holds the state before step k
        resume = self.last_complete_checkpoint(job, at_most=self._first_bad.get(job.id)) or 0
        # a stage whose copy the coordinator's disk lost resumes from its keeper's (coordinator/jobs/keepers.py)
        full, rows = self._full_checkpoints(job), self.store.checkpoints(job.id)
        if resume > 0 and not (job.resumed_from and resume == int(job.resumed_from["step"])):
            steps = [s for s in sorted(full, reverse=True) if s <= resume and set(full[s]) >= set(full[resume])]
            resume, _ = keepers.resume_point(steps, lambda s: keepers.lost_copies(rows, full[s], step=s))
        if self._first_bad.pop(job.id, None) is not None:
            # the checkpoints after it may hold a wrong result: they never count again, even if the job fails now
            self._drop_checkpoints_after(job, resume)
        tries = self._replans.get(job.id, 0)
        if tries >= MAX_REPLANS:
            self._fail(job, f"{what}; re-planned {MAX_REPLANS} times without progress; {self._checkpoint_note(job.id)}")
            return
        # a rollback: what the old attempt saved after `resume` (incomplete checkpoints, the final
        # checkpoints of the stages that got to the end) is thrown away with its steps; kept, a
        # new attempt's upload of the other stages would complete them with two attempts' weights
        self._drop_checkpoints_after(job, resume)
        jdir = files.job_dir(self.state_dir, job.id)
        try:
            has_optim = resume == 0 or (jdir / f"resume-{resume}" / files.OPTIMIZER_FILE).is_file()
            by_stage = full.get(resume, {}) if resume > 0 else {}
            lost = keepers.lost_copies(rows, by_stage, step=resume)
            stage_dirs = keepers.fill_lost(jdir, lost, by_stage, step=resume)
            if stage_dirs:  # a checkpoint of this job (not only the one it was --resumed from)
                out, has_optim = files.assemble_resume(jdir, ModelConfig.from_hf_config(job.model), stage_dirs,
                                                       step=resume)
                if lost:
                    (out / keepers.INCOMPLETE).write_text(f"stages {sorted(lost)} are filler; see their keepers\n")
            jp = plan or self._plan(job, degrade=True)
            if lost:
                self._from_keepers(jp.assignments, lost, step=resume)
        except InfeasiblePlanError as exc:
            if job.spec.node_wait_s <= 0:
                self._fail(job, f"{what}; cannot re-plan ({exc}); {self._checkpoint_note(job.id)}")
                return
            reason = (f"waiting for a node to come back or join ({what}; {exc}); resumes from step {resume} "
                      f"when it can; fails after --node-wait-s {job.spec.node_wait_s:g} s")
            if self.store.transition(job.id, "pending", reason=reason, expect="running",
                                     resume_step=resume) is not None:
                self.store.add_event(job.id, "replan", f"waiting for a node: no idle node can take over ({exc}); "
                                     f"will resume from step {resume}", attempt=job.attempt, resume_step=resume,
                                     waiting=True, cause=cause, **({"from_keepers": sorted(lost)} if lost else {}))
            return
        except SwarmError as exc:
            self._fail(job, f"{what}; cannot re-plan ({exc}); {self._checkpoint_note(job.id)}")
            return
        optim = "with its optimizer state" if has_optim else "optimizer state restarts"
        if self.store.replan(job.id, plan=jp.plan.to_json(), assignments=jp.assignments, attempt=job.attempt + 1,
                             resume_step=resume, expect_attempt=job.attempt,
                             reason=f"re-planned after {what}: resuming from step {resume} ({optim})") is not None:
            self._replans[job.id] = tries + 1
            kept = f"; stage(s) {sorted(lost)} from their keepers' copies" if lost else ""
            self.store.add_event(job.id, "replan", f"re-planning (attempt {job.attempt + 1}) on "
                                 f"{len({a['node_id'] for a in jp.assignments})} node(s): resuming from step {resume} "
                                 f"({optim}{kept})", attempt=job.attempt + 1, resume_step=resume, cause=cause,
                                 **({"from_keepers": sorted(lost)} if lost else {}))

    def _drop_checkpoints_after(self, job: Job, step: int) -> None:
        """Forget the job's checkpoints after ``step`` (the new attempt writes its own), and the
        results assembled from them."""
        self.store.drop_checkpoints_after(job.id, step)
        for d in files.job_dir(self.state_dir, job.id).glob("resume-*"):
            if d.name.removeprefix("resume-").isdigit() and int(d.name.removeprefix("resume-")) > step:
                shutil.rmtree(d, ignore_errors=True)

    def _is_online(self, node_id: str) -> bool:
        return self._node_state(node_id) == "online"

    def _node_state(self, node_id: str) -> str:
        try:
            return self.registry.get(node_id).state
        except NotFoundError:
            return "unknown"

    def _quarantine(self, job: Job, v: Verdict) -> None:
        """Quarantine a node found wrong (event ``quarantined``); the job's watch then re-plans
        without it: from the last checkpoint at or before the first bad step when it computed
        something wrong, without rollback (like a lost replica) when it only stalled."""
        if v.first_bad_step is not None:
            self._first_bad[job.id] = min(self._first_bad.get(job.id, v.first_bad_step), v.first_bad_step)
        if self.registry.quarantine(v.node_id, v.reason):
            stage = next((a for a in job.assignments if a["node_id"] == v.node_id), {})
            self.store.add_event(job.id, "quarantined", f"node {v.node_id[:12]} quarantined: {v.reason}",
                                 node=v.node_id, stage=stage.get("stage"), replica=stage.get("replica"),
                                 reason=v.reason, first_bad_step=v.first_bad_step)

    def _fail(self, job: Job, reason: str) -> None:
        with self._lock:  # the checkpoint the event names is the one that stays (checkpoint_received)
            if self.store.transition(job.id, "failed", reason=reason) is None:
                return
            self.store.add_event(job.id, "failed", f"failed: {reason}",
                                 last_complete_checkpoint=self.last_complete_checkpoint(self.store.get(job.id)))
        log.warning("job failed job=%s reason=%s", job.id, reason)

    def _finish(self, job: Job, *, replicas: list[int] | None = None) -> None:
        """Assemble the result from each stage's final checkpoint of replica 0, or (``replicas``:
        the live pipelines of a fence they outran) of the lowest of ``replicas`` that sent one."""
        config = ModelConfig.from_hf_config(job.model)
        jdir = files.job_dir(self.state_dir, job.id)
        keep = set(replicas) if replicas is not None else {0}
        finals = [c for c in self.store.checkpoints(job.id) if c["final"] and c["replica"] in keep
                  and (c["replica"] == 0 or (Path(c["dir"]) / "weights.safetensors").is_file())]
        by_stage = {c["stage"]: Path(c["dir"]) for c in sorted(finals, key=lambda c: -c["replica"])}
        num_stages = max(a["stage"] for a in job.assignments) + 1
        if set(by_stage) != set(range(num_stages)):
            self._fail(job, f"stages {sorted(set(range(num_stages)) - set(by_stage))} finished without a final checkpoint")
            return
        try:
            files.assemble_result(jdir, config, [by_stage[s] for s in range(num_stages)])
        except SwarmError as exc:
            self._fail(job, f"could not assemble the final checkpoint: {exc}")
            return
        self.store.set_result_ready(job.id)
        if self.store.transition(job.id, "succeeded", expect="running") is not None:
            self.store.add_event(job.id, "succeeded", f"succeeded: {job.total_steps} steps; the model is ready "
                                 "(`swarm job ID --download DIR`)")

    # -- node side -------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "") -> Job:
        job = self.store.get(job_id)
        if job.terminal:
            return job
        reason = reason or "cancelled by the user"
        with self._lock:  # no checkpoint is recorded between the state change and its note (checkpoint_received)
            if self.store.transition(job_id, "cancelled", reason=reason) is not None:
                self.store.add_event(job_id, "cancelled", f"cancelled: {reason}; {self._checkpoint_note(job_id)}")
        return self.store.get(job_id)
