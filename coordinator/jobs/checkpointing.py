"""The checkpoint side of the job service (:class:`Checkpointing`, a part of
:class:`coordinator.jobs.service.JobService`): what the coordinator holds of a job's checkpoints
and what it does with them.

- Workers upload each stage's checkpoint (weights; optimizer state and data position with it)
  through the transfer module; :meth:`Checkpointing.checkpoint_received` checks it
  (coordinator/jobs/checkpoint_check.py: names, shapes, dtypes, finite, attempt) before it counts,
  and records its SHA-256 and its keeper (the second node holding a copy: coordinator/jobs/keepers.py).
- A step is *complete* when every stage has a checkpoint of it
  (:meth:`Checkpointing.last_complete_checkpoint`); re-plans resume from one, taking a lost or
  corrupt stage copy from its keeper (:meth:`Checkpointing._from_keepers`).
- ``download`` / ``result_files`` serve the final export; ``resume`` starts a new job from another
  job's last complete checkpoint.

The host class provides ``store``, ``state_dir``, ``_lock``, ``tick`` and ``_check_online``.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from swarm.errors import InfeasiblePlanError, InvalidRequestError, NotFoundError, PermissionDeniedError
from swarm.job_spec import MAX_STEPS, JobSpec
from swarm.model.config import ModelConfig
from swarm.pipeline.data import BatchOrder

from coordinator.jobs import churn, files, keepers
from coordinator.jobs.planning import check_layers
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)


class Checkpointing:
    """Checkpoints for :class:`~coordinator.jobs.service.JobService`."""

    def resume(self, source_id: str, spec: JobSpec) -> Job:
        """A new job that starts from ``source_id``'s last complete checkpoint (weights, AdamW state,
        data position = the step) with ``spec`` (the source's spec with the user's changes).
        Raises InvalidRequestError (source still running, changed data-shaping flags, steps not past
        the checkpoint) or NotFoundError (no complete checkpoint)."""
        with self._lock:
            src = self.store.get(source_id)
            if not src.terminal:
                raise InvalidRequestError(f"job {src.id} is {src.state}; cancel it first (`swarm cancel {src.id}`) "
                                          "or wait for it to end, then --resume it")
            step = self.last_complete_checkpoint(src)
            if step is None:
                raise NotFoundError(f"job {src.id} has no complete checkpoint to resume from (it ended before every "
                                    "stage saved one; --checkpoint-every sets how often they do)")
            for flag, name in (("--seq-len", "seq_len"), ("--batch-size", "batch_size"), ("--seed", "seed")):
                if getattr(spec, name) != getattr(src.spec, name):
                    raise InvalidRequestError(
                        f"{flag} {getattr(spec, name)} differs from job {src.id}'s {getattr(src.spec, name)}; a resumed "
                        "job keeps the data and its order (leave the flag out)")
            config = ModelConfig.from_hf_config(src.model)
            check_layers(spec, config)
            self._check_online(spec)
            order = BatchOrder(num_samples=src.num_samples, batch_size=spec.batch_size,
                               micro_batch_size=spec.micro_batch_size, seed=spec.seed)
            total = spec.steps or order.steps_for_epochs(spec.epochs)
            if not step < total <= MAX_STEPS:
                raise InvalidRequestError(f"job {src.id}'s checkpoint is at step {step}: the resumed job needs more "
                                          f"steps than that (it would have {total}); pass --steps N with N > {step}")
            job_id = uuid.uuid4().hex[:12]
            sdir, jdir = files.job_dir(self.state_dir, src.id), files.job_dir(self.state_dir, job_id)
            try:
                jdir.mkdir(parents=True)
                files.link_or_copy_tree(sdir / "init", jdir / "init")
                files.link_or_copy(sdir / "data.npy", jdir / "data.npy")
                _, has_optim = files.assemble_resume(jdir, config, self._stage_dirs(src, step), step=step)
            except BaseException:
                shutil.rmtree(jdir, ignore_errors=True)
                raise
            job = self.store.create(job_id=job_id, spec=spec, model=src.model, num_samples=src.num_samples,
                                    dataset_key=src.dataset_key, total_steps=total,
                                    resumed_from={"job_id": src.id, "step": step})
            note = "with its optimizer state" if has_optim else "optimizer state restarts: the checkpoint has none"
            self.store.add_event(job.id, "submitted", f"submitted: resumes job {src.id} at step {step} of {total} "
                                 f"({note})", total_steps=total, resumed_from=src.id, step=step)
            self.tick()
            return self.store.get(job.id)

    def _full_checkpoints(self, job: Job) -> dict[int, dict[int, Path]]:
        """step -> stage -> the coordinator's copy holding the stage's weights at that step (replica
        0's when it sent one, else the lowest replica's: after a fence replica 0 may be gone)."""
        out: dict[int, dict[int, Path]] = {}
        for c in sorted(self.store.checkpoints(job.id), key=lambda c: -c["replica"]):
            d = Path(c["dir"])
            if c["replica"] == 0 or (d / "weights.safetensors").is_file():
                out.setdefault(c["step"], {})[c["stage"]] = d
        return out

    def _stage_dirs(self, job: Job, step: int) -> list[Path]:
        """The coordinator's copies of the stage checkpoints at ``step``, by stage."""
        by_stage = self._full_checkpoints(job).get(step, {})
        return [by_stage[s] for s in sorted(by_stage)]

    def download(self, job_id: str) -> tuple[int, list[Path]]:
        """(step, files) of the job's final model when it succeeded, else of its last complete
        checkpoint (assembled on demand). Raises NotFoundError when there is neither."""
        with self._lock:
            job = self.store.get(job_id)
            jdir = files.job_dir(self.state_dir, job.id)
            if job.result_ready:
                return job.total_steps, files.download_files(jdir / "result")
            step = self.last_complete_checkpoint(job)
            if step is None:
                raise NotFoundError(f"job {job.id} ({job.state}) has no complete checkpoint yet; "
                                    "--checkpoint-every sets how often the stages save one")
            out = jdir / f"resume-{step}"
            if (out / keepers.INCOMPLETE).is_file():
                raise NotFoundError(f"job {job.id}'s checkpoint at step {step} is incomplete on the coordinator (a "
                                    "stage's copy was lost and resumes from a node's copy); try again after the "
                                    "next checkpoint")
            if not (out / "config.json").is_file():
                files.assemble_resume(jdir, ModelConfig.from_hf_config(job.model), self._stage_dirs(job, step), step=step)
            return step, files.download_files(out)

    # -- planning and watching --------------------------------------------------------------------

    def last_complete_checkpoint(self, job: Job, *, at_most: int | None = None) -> int | None:
        """The latest step (at most ``at_most``) for which every stage's checkpoint copy reached the
        coordinator (for a job started with --resume, at least the step it started from)."""
        stages = {a["stage"] for a in job.assignments}
        complete = [step for step, have in self._full_checkpoints(job).items()
                    if stages and set(have) >= stages and (at_most is None or step <= at_most)]
        if job.resumed_from:
            complete.append(int(job.resumed_from["step"]))  # its resume-N/ is complete by construction
        return max(complete) if complete else None

    def _checkpoint_note(self, job_id: str) -> str:
        step = self.last_complete_checkpoint(self.store.get(job_id))
        if step is None:
            return "no complete checkpoint was taken yet"
        return f"last complete checkpoint: step {step}, kept in the coordinator and on the nodes"

    def _from_keepers(self, assignments: list[dict[str, Any]], lost: dict[int, dict[str, Any]], *, step: int) -> None:
        """Name each lost stage's keeper as the required state source of the new workers holding its
        layers. Raises InfeasiblePlanError (wait for it) when some lost stage's keeper is not in the new plan."""
        sources, serves = churn.keeper_sources(bad=lost, new=assignments, step=step)
        layers = {(r["first_layer"], r["last_layer_excl"]) for r in lost.values() if "first_layer" in r}
        # every lost layer range must be held, whole, by a new worker copying the keeper's copy:
        # a plan that splits the layers differently would serve the filler of resume-N/
        have = {(a["first_layer"], a["last_layer_excl"]) for a in assignments}
        if len(layers) < len(lost) or not layers <= have:
            raise InfeasiblePlanError(f"the coordinator's copy of stage(s) {sorted(lost)} at step {step} is lost and "
                                      "the new plan does not give their layers to one worker each (the node "
                                      "keeping the second copy can only hand over a whole stage)")
        for a, src, serve in zip(assignments, sources, serves):
            if (a["first_layer"], a["last_layer_excl"]) in layers and src is None:
                raise InfeasiblePlanError(f"the coordinator's copy of layers {a['first_layer']}-{a['last_layer_excl']} "
                                          f"at step {step} is lost and the node keeping its second copy is not online")
            a["state_source"], a["state_serves"] = src, serve
        log.warning("resuming lost stage copies from their keepers step=%d stages=%s", step, sorted(lost))

    def check_checkpoint(self, job: Job, *, stage: int, replica: int, attempt: int) -> None:
        """Refuse (PermissionDeniedError) a checkpoint of another attempt than the job's, or of a
        worker a fence left out (its pipeline is broken: its state is not the survivors')."""
        if attempt and attempt != job.attempt:
            raise PermissionDeniedError(f"checkpoint of attempt {attempt}; job {job.id} is at attempt {job.attempt}")
        if job.fence is not None and churn.key(stage, replica) not in job.fence["workers"]:
            raise PermissionDeniedError(f"stage {stage} replica {replica} of job {job.id} was dropped")

    def checkpoint_received(self, job_id: str, node_id: str, *, stage: int, replica: int, step: int, final: bool,
                            directory: Path) -> None:
        """Record a received checkpoint. Raises InvalidRequestError (and records nothing) when the
        job ended while it was uploading: a cancelled or failed job's last complete checkpoint,
        which the user was told and may download, never moves afterwards."""
        with self._lock:  # against cancel() and _fail(): the state is read and the row written at once
            job = self.store.get(job_id)
            if job.terminal and not final:
                raise InvalidRequestError(f"job {job_id} is {job.state}; checkpoint of step {step} not needed")
            self.store.add_checkpoint(job_id, stage=stage, replica=replica, step=step, final=final,
                                      directory=str(directory),
                                      copy=keepers.copy_record(directory, job.assignments, stage=stage, replica=replica))
        log.info("checkpoint received job=%s stage=%d replica=%d step=%d final=%s", job_id, stage, replica, step, final)

    def result_files(self, job_id: str) -> list[Path]:
        job = self.store.get(job_id)
        if not job.result_ready:
            raise NotFoundError(f"job {job_id} has no result yet (state {job.state})")
        return files.download_files(files.job_dir(self.state_dir, job_id) / "result")
