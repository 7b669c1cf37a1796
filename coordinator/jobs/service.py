"""The coordinator's training-job logic: submit, plan, assign, watch, collect, export.

:class:`JobService` holds no protobuf (the servicer in :mod:`coordinator.jobs.servicer`
translates). Its loop (:meth:`tick`, every ``tick_interval_s``) plans pending jobs over idle
online nodes, fails running jobs whose nodes were lost, and assembles the result of jobs whose
every stage delivered its final checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from swarm.clock import Clock
from swarm.errors import InfeasiblePlanError, InvalidRequestError, NotFoundError, PermissionDeniedError, SwarmError
from swarm.job_detail import JobDetail
from swarm.job_spec import MAX_STEPS, JobSpec
from swarm.model.config import ModelConfig
from swarm.pipeline.data import BatchOrder
from swarm.transport.transfer import receive_files

from coordinator.jobs import files
from coordinator.jobs.planning import JobPlan, busy_node_ids, plan_job
from coordinator.jobs.spotchecks import Judge, Verdict, verify_plans
from coordinator.jobs.store import Job, JobStore

log = logging.getLogger(__name__)

MAX_REPLANS = 3  # a job re-planned this often after losing nodes fails instead


class JobService:
    """Thread-safe. ``state_dir`` holds the job files; ``registry``/``network`` are the app's."""

    def __init__(self, *, store: JobStore, state_dir: Path, registry, network, clock: Clock,
                 limits: files.UploadLimits | None = None, tick_interval_s: float = 0.5) -> None:
        self.store = store
        self.state_dir = Path(state_dir)
        self.registry = registry
        self.network = network
        self.clock = clock
        self.limits = limits or files.UploadLimits()
        self.tick_interval_s = tick_interval_s
        self._lock = threading.RLock()
        self._rendezvous: dict[tuple[str, int, int], dict[int, list[str]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.judge = Judge()  # spot checks and blame (coordinator/jobs/spotchecks.py)
        self._first_bad: dict[str, int] = {}  # job id -> first step a spot check found wrong
        # job events (quarantine, re-plan for verification): logged; the events table can subscribe
        self.on_event = lambda job_id, kind, message: log.warning("job event job=%s kind=%s %s", job_id, kind, message)

    # -- loop ----------------------------------------------------------------------------------
    def start(self) -> None:
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
        with self._lock:
            for job in self.store.list(states=("running",), limit=1000):
                self._watch(job)
            for job in sorted(self.store.list(states=("pending",), limit=1000), key=lambda j: j.created_at_s):
                self._try_plan(job)

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, items) -> Job:
        """``items``: the upload as :class:`~swarm.transport.transfer.FileHeader` and ``bytes`` items, in order."""
        job_id = uuid.uuid4().hex[:12]
        jdir = files.job_dir(self.state_dir, job_id)
        try:
            receive_files(items, jdir / "upload", limits=self.limits, roots=("data", "checkpoint"))
            prepared = files.prepare_job(jdir, seq_len=spec.seq_len, seed=spec.seed,
                                         max_model_params=self.limits.max_model_params)
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
        self.tick()
        return self.store.get(job.id)

    # -- planning and watching --------------------------------------------------------------------
    def _plan(self, job: Job, *, shrink: bool = False) -> JobPlan:
        """Plan ``job`` over the online nodes no other running job holds (its own count as free:
        a running job being re-planned gives its nodes back). ``shrink`` (re-plans): with too few
        nodes for the asked replicas, fewer replicas carry the same global batch. Each
        assignment gets its spot-check plan. Raises InfeasiblePlanError."""
        others = [j for j in self.store.list(states=("running",), limit=1000) if j.id != job.id]
        busy = busy_node_ids(others)
        nodes = [n for n in self.registry.online() if n.id not in busy]
        matrix = self.network.matrix([n.id for n in nodes])
        spec = job.spec
        while True:
            try:
                jp = plan_job(spec=spec, config=ModelConfig.from_hf_config(job.model), nodes=nodes,
                              delay_s=matrix[0], bandwidth_Bps=matrix[1], seed=job.spec.seed)
                break
            except InfeasiblePlanError:
                if not (shrink and spec.num_replicas > 1):
                    raise
                spec = spec.replace(num_replicas=spec.num_replicas - 1)
        for a, v in zip(jp.assignments, verify_plans(jp.assignments, prob=job.spec.verify_prob)):
            a["verify"] = v
        return jp

    def _try_plan(self, job: Job) -> None:
        try:
            jp = self._plan(job)
        except InfeasiblePlanError as exc:
            reason = f"waiting: {exc}"
            if job.reason != reason:
                self.store.set_reason(job.id, reason)
                log.info("job cannot be planned yet job=%s reason=%s", job.id, exc)
            return
        self.store.transition(job.id, "running", expect="pending", plan=jp.plan.to_json(),
                              assignments=jp.assignments, attempt=job.attempt + 1)

    def _watch(self, job: Job) -> None:
        verdicts, dispute = self.judge.resolve_blames(job.id, self.clock.time(), grace_s=job.spec.peer_timeout_s)
        for v in verdicts:
            self._quarantine(job, v)
        if dispute and not verdicts:
            self._recover(job, "two stages blame each other for stopping")
            return
        for a in job.assignments:
            try:
                state = self.registry.get(a["node_id"]).state
            except NotFoundError:
                state = "lost"
            if state != "online":
                self._recover(job, f"node {a['node_id'][:12]} (stage {a['stage']}, replica {a['replica']}) is {state}")
                return
        # from the store, not memory: a coordinator restarted mid-job still sees the stages that finished
        done = {(c["stage"], c["replica"]) for c in self.store.checkpoints(job.id) if c["final"]}
        need = {(a["stage"], a["replica"]) for a in job.assignments}
        if need and need <= done:
            self._finish(job)

    def last_complete_checkpoint(self, job: Job, *, at_most: int | None = None) -> int | None:
        """The latest step (at most ``at_most``) for which every stage's checkpoint copy reached
        the coordinator."""
        stages = {a["stage"] for a in job.assignments}
        by_step: dict[int, set[int]] = {}
        for c in self.store.checkpoints(job.id):
            if at_most is not None and c["step"] > at_most:
                continue
            if c["replica"] == 0:
                by_step.setdefault(c["step"], set()).add(c["stage"])
        complete = [step for step, have in by_step.items() if stages and have >= stages]
        return max(complete) if complete else None

    def _checkpoint_note(self, job_id: str) -> str:
        step = self.last_complete_checkpoint(self.store.get(job_id))
        if step is None:
            return "no complete checkpoint was taken yet"
        return f"last complete checkpoint: step {step}, kept in the coordinator and on the nodes"

    def _recover(self, job: Job, what: str) -> None:
        """Re-plan a running job that lost a node over the idle online nodes, resuming after its
        last complete checkpoint; fail it (keeping the checkpoints) when that is not possible."""
        # before the first step a spot check found wrong: a checkpoint k holds steps < k
        resume = self.last_complete_checkpoint(job, at_most=self._first_bad.get(job.id)) or 0
        if job.attempt > MAX_REPLANS:
            self._fail(job, f"{what}; re-planned {MAX_REPLANS} times already; {self._checkpoint_note(job.id)}")
            return
        try:
            jp = self._plan(job, shrink=True)
            if resume > 0:
                finals = {c["stage"]: Path(c["dir"]) for c in self.store.checkpoints(job.id)
                          if c["step"] == resume and c["replica"] == 0}
                files.assemble_result(files.job_dir(self.state_dir, job.id), ModelConfig.from_hf_config(job.model),
                                      [finals[s] for s in sorted(finals)], name=f"resume-{resume}")
        except (InfeasiblePlanError, SwarmError) as exc:
            self._fail(job, f"{what}; cannot re-plan ({exc}); {self._checkpoint_note(job.id)}")
            return
        self.store.replan(job.id, plan=jp.plan.to_json(), assignments=jp.assignments, attempt=job.attempt + 1,
                          resume_step=resume, expect_attempt=job.attempt,
                          reason=f"re-planned after {what}: resuming from step {resume} (optimizer state restarts)")

    def _quarantine(self, job: Job, v: Verdict) -> None:
        """Quarantine a node found wrong; the job's watch then re-plans without it."""
        if v.first_bad_step is not None:
            self._first_bad[job.id] = min(self._first_bad.get(job.id, v.first_bad_step), v.first_bad_step)
        if self.registry.quarantine(v.node_id, v.reason):
            self.on_event(job.id, "quarantine", f"node {v.node_id[:12]} quarantined: {v.reason}")

    def _fail(self, job: Job, reason: str) -> None:
        if self.store.transition(job.id, "failed", reason=reason) is not None:
            log.warning("job failed job=%s reason=%s", job.id, reason)

    def _finish(self, job: Job) -> None:
        config = ModelConfig.from_hf_config(job.model)
        jdir = files.job_dir(self.state_dir, job.id)
        finals = [c for c in self.store.checkpoints(job.id) if c["final"] and c["replica"] == 0]
        by_stage = {c["stage"]: Path(c["dir"]) for c in finals}
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
        self.store.transition(job.id, "succeeded", expect="running")

    # -- node side -------------------------------------------------------------------------------
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
            if not mine:
                continue
            if job.state == "running":
                active += [(job, a) for a in mine]
            elif job.state in ("failed", "cancelled") and now - (job.finished_at_s or now) < 600:
                stop.append(job.id)
        return active, stop

    def report(self, node_id: str, r: dict[str, Any]) -> tuple[bool, str]:
        """Record one progress report; returns (stop, reason) for the node."""
        job, a = self.assignment_of(r["job_id"], node_id, stage=r["stage"], replica=r["replica"])
        if job.terminal:
            return True, f"job is {job.state}: {job.reason}"
        if r["attempt"] != job.attempt:
            return True, f"stale attempt {r['attempt']} (job is at attempt {job.attempt})"
        blamed = r.get("blame_node_id") or ""
        if r["state"] == "failed" and blamed and blamed != node_id and any(
                x["node_id"] == blamed for x in job.assignments):
            # weighed after peer_timeout_s (coordinator/jobs/spotchecks.py Judge.resolve_blames)
            self.judge.blame(job.id, node_id, blamed, self.clock.time())
            log.warning("stage failed blaming a neighbour job=%s reporter=%s blamed=%s: %s", job.id, node_id[:12],
                        blamed[:12], r["error"][:300])
            return True, "the coordinator weighs the failure and re-plans"
        if r["state"] == "failed":
            self._fail(job, f"stage {a['stage']} replica {a['replica']} on node {node_id[:12]} failed: "
                            f"{r['error'][:500]}; {self._checkpoint_note(job.id)}")
            return True, "job failed"
        if r["state"] == "running" and not 0 <= r["step"] < job.total_steps:
            raise InvalidRequestError(f"progress for step {r['step']} outside 0..{job.total_steps - 1}")
        if r["state"] == "running":
            self.judge.progress(job.id, node_id, self.clock.time())
            for v in self.judge.report(job.id, job.attempt, a, job.assignments, r):
                self._quarantine(job, v)
            self.store.add_progress(job.id, attempt=job.attempt, stage=a["stage"], replica=a["replica"],
                                    step=r["step"], loss=r["loss"], tokens=r["tokens"], tokens_per_s=r["tokens_per_s"],
                                    bytes_sent=r["bytes_sent"], bytes_raw=r["bytes_raw"], step_s=r["step_s"],
                                    compute_s=r["compute_s"], wait_s=r["wait_s"], comm_s=r["comm_s"],
                                    bytes_forward=r["bytes_forward"], bytes_backward=r["bytes_backward"])
        return False, ""

    def checkpoint_received(self, job_id: str, node_id: str, *, stage: int, replica: int, step: int, final: bool,
                            directory: Path) -> None:
        self.store.add_checkpoint(job_id, stage=stage, replica=replica, step=step, final=final, directory=str(directory))
        log.info("checkpoint received job=%s stage=%d replica=%d step=%d final=%s", job_id, stage, replica, step, final)

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
    def cancel(self, job_id: str, reason: str = "") -> Job:
        job = self.store.get(job_id)
        if job.terminal:
            return job
        self.store.transition(job_id, "cancelled", reason=reason or "cancelled by the user")
        return self.store.get(job_id)

    def detail(self, job: Job) -> dict[str, Any]:
        """The JSON of GET /api/jobs/{id}: record, plan, assignments, progress history, totals."""
        return self.detail_record(job).to_json()

    def job_details(self, *, states: tuple[str, ...] | None = None, limit: int = 200) -> list[JobDetail]:
        """The newest ``limit`` jobs (only those in ``states`` if given) as records, newest first."""
        return [self.detail_record(job) for job in self.store.list(limit=limit, states=states)]

    def detail_record(self, job: Job) -> JobDetail:
        """The job as the typed record its JSON is made from (:class:`swarm.job_detail.JobDetail`)."""
        reporters = len(job.assignments)
        history = self.store.history(job.id, num_reporters=reporters) if reporters else []
        last = history[-1] if history else None
        names = {n.id: n.name for n in self.registry.snapshot()}
        cfg = job.model
        eta = None
        if last and job.state == "running" and last["step_s"]:
            recent = history[-5:]
            eta = (job.total_steps - last["step"] - 1) * sum(h["step_s"] for h in recent) / len(recent)
        return JobDetail.from_json({
            "id": job.id, "state": job.state, "reason": job.reason, "spec": job.spec.to_dict(),
            "model": {"family": cfg.get("model_type"), "num_layers": cfg.get("n_layer", cfg.get("num_hidden_layers")),
                      "hidden_size": cfg.get("n_embd", cfg.get("hidden_size")),
                      "num_parameters": ModelConfig.from_hf_config(cfg).num_parameters()},
            "num_samples": job.num_samples, "dataset_key": job.dataset_key,
            "total_steps": job.total_steps, "attempt": job.attempt, "resume_step": job.resume_step,
            "step": last["step"] if last else None,
            "loss": last["loss"] if last else None,
            "tokens_per_s": last["tokens_per_s"] if last else None,
            "bytes_sent": sum(h["bytes_sent"] for h in history),
            "bytes_saved": sum(h["bytes_saved"] for h in history),
            "eta_s": eta,
            "created_at": job.created_at_s, "started_at": job.started_at_s, "finished_at": job.finished_at_s,
            "plan": job.plan,
            "assignments": [
                {"node_id": a["node_id"], "node_name": names.get(a["node_id"], ""), "stage": a["stage"],
                 "replica": a["replica"], "layers": [a["first_layer"], a["last_layer_excl"]]}
                for a in job.assignments
            ],
            "workers": self.store.per_worker(job.id),
            "progress": history,
            "checkpoints": [{k: c[k] for k in ("step", "stage", "replica", "final")} for c in self.store.checkpoints(job.id)],
            "result_ready": job.result_ready,
            "last_complete_checkpoint": self.last_complete_checkpoint(job),
        })

    def result_files(self, job_id: str) -> list[Path]:
        job = self.store.get(job_id)
        if not job.result_ready:
            raise NotFoundError(f"job {job_id} has no result yet (state {job.state})")
        out = files.job_dir(self.state_dir, job_id) / "result"
        return sorted(p for p in out.iterdir() if p.is_file())


def detail_json(service: JobService, job: Job) -> str:
    return json.dumps(service.detail(job), default=float)


