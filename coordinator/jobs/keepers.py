"""Second copies of checkpoints, on the coordinator's side (node/training/kept.py is the node's).

1. Every assignment names a checkpoint keeper (churn.with_keepers). When a checkpoint upload
   arrives, :func:`copy_record` notes, in the store next to the file's path, the SHA-256 of its
   ``weights.safetensors`` and ``optimizer.safetensors``, the stage's layers and the node that
   keeps the second copy: this survives the coordinator's disk losing the files.
2. At a re-plan from the checkpoint at step ``N``, :func:`lost_copies` finds the stages whose
   copy is missing or no longer has the recorded hashes. :func:`fill_lost` puts the stage's
   *initial* weights in their place, only so that the other stages can be served from the
   assembled ``resume-N/`` (marked :data:`INCOMPLETE`: never downloaded as the model), and
   churn.keeper_sources names the keeper as the ``required`` state source of the new workers of
   that stage, with the recorded hashes: they copy it peer to peer, or fail (never the filler).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save as st_save

from swarm.errors import NotFoundError
from swarm.transport.transfer import sha256_file

from coordinator.jobs import churn, files

log = logging.getLogger(__name__)
WEIGHTS, OPTIMIZER = "weights.safetensors", "optimizer.safetensors"
INCOMPLETE = "INCOMPLETE"  # in resume-N/: some stage's weights there are filler (see fill_lost)


def copy_record(directory: Path, assignments: list[dict[str, Any]], *, stage: int, replica: int) -> dict[str, Any]:
    """What the store keeps of an uploaded checkpoint besides its path (empty without weights)."""
    w, o = Path(directory) / WEIGHTS, Path(directory) / OPTIMIZER
    if not (w.is_file() and o.is_file()):
        return {}
    a = next((a for a in assignments if (a["stage"], a["replica"]) == (stage, replica)), None)
    keeper = (churn.checkpoint_keepers(assignments).get(churn.key(stage, replica)) if a is not None else None)
    rec: dict[str, Any] = {"weights_sha256": sha256_file(w), "optimizer_sha256": sha256_file(o), "keeper": keeper}
    if a is not None:
        rec.update(first_layer=a["first_layer"], last_layer_excl=a["last_layer_excl"],
                   is_last=a["stage"] == a["num_stages"] - 1)
    return rec


def lost_copies(checkpoints: list[dict[str, Any]], by_stage: dict[int, Path], *, step: int) -> dict[int, dict]:
    """stage -> its upload record (:func:`copy_record`) for the stages whose copy at ``step`` in
    ``by_stage`` is missing or differs from the hashes recorded when it arrived (copies recorded
    before hashes were: never lost)."""
    rec_of = {c["dir"]: c.get("copy") or {} for c in checkpoints if c["step"] == step}
    out: dict[int, dict[str, Any]] = {}
    for stage, d in by_stage.items():
        rec = rec_of.get(str(d)) or {}
        if not rec.get("weights_sha256"):
            continue
        w, o = Path(d) / WEIGHTS, Path(d) / OPTIMIZER
        ok = (w.is_file() and o.is_file() and sha256_file(w) == rec["weights_sha256"]
              and sha256_file(o) == rec["optimizer_sha256"])
        if not ok:
            log.warning("the coordinator's copy of stage %d at step %d is missing or corrupt dir=%s keeper=%s",
                        stage, step, d, (rec.get("keeper") or "none")[:12])
            out[stage] = rec
    return out


def fill_lost(jdir: Path, lost: dict[int, dict[str, Any]], by_stage: dict[int, Path], *, step: int) -> list[Path]:
    """The stage dirs to assemble ``resume-{step}/`` from: ``by_stage``'s, with each lost stage's
    replaced by its initial weights (filler; see the module docstring). Raises SwarmError when
    a lost stage's layers are unknown."""
    out = []
    for stage, d in sorted(by_stage.items()):
        rec = lost.get(stage)
        if rec is None:
            out.append(Path(d))
            continue
        if "first_layer" not in rec:
            raise NotFoundError(f"stage {stage}'s copy at step {step} is lost and its layers were not recorded")
        filler = jdir / f"filler-{step}-stage-{stage}"
        filler.mkdir(parents=True, exist_ok=True)
        (filler / WEIGHTS).write_bytes(files.stage_weights_bytes(
            jdir, rec["first_layer"], rec["last_layer_excl"], is_first=rec["first_layer"] == 0,
            is_last=bool(rec.get("is_last")), source="init"))
        # no AdamW state here: the merged resume optimizer then holds the other stages' only
        (filler / OPTIMIZER).write_bytes(st_save({}))
        out.append(filler)
    return out


def kept_stages(assignments: list[dict[str, Any]], node_id: str) -> list[int]:
    """The stages whose checkpoints ``node_id`` keeps in this attempt."""
    return sorted(int(k.split(":")[0]) for k, n in churn.checkpoint_keepers(assignments).items() if n == node_id)


def resume_point(steps_newest_first: list[int], lost_at) -> tuple[int, dict[int, dict[str, Any]]]:
    """(step, lost copies there) to resume from: the newest complete checkpoint step whose lost
    copies (``lost_at(step)``, :func:`lost_copies`) were all reported kept by their keepers; 0
    (from the start, nothing lost) when none is."""
    for step in steps_newest_first:
        lost = lost_at(step)
        if all(rec.get("kept") for rec in lost.values()):
            return step, lost
        log.warning("checkpoint of step %d lost on the coordinator for stages %s and not reported kept by their "
                    "keepers; trying an earlier one", step, sorted(lost))
    return 0, {}
