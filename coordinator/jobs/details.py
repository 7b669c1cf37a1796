"""What the CLI, the web page and GET /api/jobs/{id} show of a training job: the typed record
(:class:`swarm.job_detail.JobDetail`) built from the job store, the registry and the spot-check
judge. A mixin of :class:`coordinator.jobs.service.JobService` (it provides ``store``,
``registry``, ``judge`` and ``last_complete_checkpoint``)."""

from __future__ import annotations

from typing import Any

from swarm.job_detail import JobDetail
from swarm.model.config import ModelConfig

from coordinator.jobs import churn
from coordinator.jobs.store import Job


class Details:
    """Job records for the user-facing views (see the module docstring)."""

    def detail(self, job: Job) -> dict[str, Any]:
        """The JSON of GET /api/jobs/{id}: record, plan, assignments, progress history, totals."""
        return self.detail_record(job).to_json()

    def job_details(self, *, states: tuple[str, ...] | None = None, limit: int = 200) -> list[JobDetail]:
        """The newest ``limit`` jobs (only those in ``states`` if given) as records, newest first."""
        return [self.detail_record(job) for job in self.store.list(limit=limit, states=states)]

    def detail_record(self, job: Job) -> JobDetail:
        """The job as the typed record its JSON is made from (:class:`swarm.job_detail.JobDetail`)."""
        # a step counts once every worker of the attempt reported it; once the job succeeded,
        # once every stage did (a replica lost in the last steps left them to the others)
        reporters = len(job.assignments)
        history = self.store.history(job.id, num_reporters=reporters, attempt=job.attempt,
                                     over=job.state == "succeeded") if reporters else []
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
                 "replica": a["replica"], "layers": [a["first_layer"], a["last_layer_excl"]],
                 # a helper of a stage (coordinator/jobs/helpers.py) runs share_index mod share_count of
                 # pipeline's micro-batches there; everybody else all of its own pipeline's
                 "pipeline": a.get("pipeline", a["replica"]), "share_index": a.get("share_index", 0),
                 "share_count": a.get("share_count", 1)}
                for a in job.assignments
            ],
            "workers": self.store.per_worker(job.id),
            "progress": history,
            "checkpoints": [{k: c[k] for k in ("step", "stage", "replica", "final")} for c in self.store.checkpoints(job.id)],
            "result_ready": job.result_ready,
            "last_complete_checkpoint": self.last_complete_checkpoint(job),
            "resumed_from": job.resumed_from,
            "events": self.store.events(job.id),
            "repeated_steps": self.store.repeated_steps(job.id),
            "rolled_back_steps": churn.split_repeats(self.store.repeat_attempts(job.id),
                                                     churn.rollback_attempts(self.store.events(job.id)))[0],
            "spot_checks": self.judge.stats(job.id),
        })
