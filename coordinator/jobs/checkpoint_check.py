"""Checking an uploaded stage checkpoint before it counts (docs/security.md, "Verification").

A checkpoint copy is parsed and compared with what the stage must hold: the tensor names,
shapes and dtypes of the stage's part of the job's initial model, every value finite, and the
``meta.json`` naming the job, stage, replica and step of the upload.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from swarm.errors import InvalidRequestError


def expected_layout(init_blob: bytes) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a stage's initial weights (a safetensors blob)."""
    from safetensors.torch import load

    return {k: (tuple(v.shape), str(v.dtype)) for k, v in load(init_blob).items()}


def check_stage_checkpoint(directory: Path, *, layout: dict[str, tuple[tuple[int, ...], str]], job_id: str,
                           stage: int, replica: int, step: int) -> None:
    """Raise InvalidRequestError naming what is wrong with the checkpoint under ``directory``."""
    meta_path = Path(directory) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"checkpoint meta.json is missing or not JSON: {exc}") from exc
    if not isinstance(meta, dict) or (meta.get("job_id"), meta.get("stage"), meta.get("replica"), meta.get("step")) != (
            job_id, stage, replica, step):
        raise InvalidRequestError("checkpoint meta.json does not name this job, stage, replica and step")
    weights = Path(directory) / "weights.safetensors"
    if not weights.is_file():
        return  # replicas > 0 upload only their meta (replica 0 carries the weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            if names != set(layout):
                missing, extra = sorted(set(layout) - names)[:3], sorted(names - set(layout))[:3]
                raise InvalidRequestError(f"checkpoint tensors differ from the stage's: missing {missing}, extra {extra}")
            for name in names:
                t = f.get_tensor(name)
                shape, dtype = layout[name]
                if tuple(t.shape) != shape or str(t.dtype) != dtype:
                    raise InvalidRequestError(f"checkpoint tensor {name} is {tuple(t.shape)} {t.dtype}, "
                                              f"expected {shape} {dtype}")
                if not bool(t.float().isfinite().all()):
                    raise InvalidRequestError(f"checkpoint tensor {name} has NaN or Inf values")
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any parse failure of an untrusted file is the sender's fault
        raise InvalidRequestError(f"checkpoint weights are not a readable safetensors file: {exc}") from exc
    if not math.isfinite(float(step)):
        raise InvalidRequestError("checkpoint step is not finite")
