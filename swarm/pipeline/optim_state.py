"""AdamW state of a stage under HF parameter names, so it survives a different stage split.

A checkpoint's ``optimizer.safetensors`` holds, for every parameter of the stage, its first and
second moments as ``exp_avg.<HF name>`` and ``exp_avg_sq.<HF name>`` (in the HF layout: GPT-2's
Conv1D weights transposed like the weights themselves) and one scalar ``adamw.step`` (AdamW's
step count, the same for every parameter). Global layer indices make the names independent of
how layers were split into stages: merging the files of all stages gives the whole model's
state, and any other split picks its own names from it (:func:`load_stage_optimizer_state`).
"""

from __future__ import annotations

import torch

from swarm.errors import InvalidRequestError
from swarm.model.hf_names import local_to_hf
from swarm.model.stage import StageModel

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = "adamw.step"


def moment_key(moment: str, hf_name: str) -> str:
    return f"{moment}.{hf_name}"


def param_name(key: str) -> str | None:
    """The HF parameter name of a moment tensor's key (None for ``adamw.step``)."""
    for m in sorted(MOMENTS, key=len, reverse=True):  # exp_avg_sq before its prefix exp_avg
        if key.startswith(m + "."):
            return key[len(m) + 1:]
    return None


def stage_optimizer_state(module: StageModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state of ``module``'s parameters as HF-named CPU tensors (empty before the
    first step)."""
    out: dict[str, torch.Tensor] = {}
    step = None
    for local, p in module.named_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        hf, transpose = local_to_hf(module.config, local, module.first_layer)
        for m in MOMENTS:
            t = st[m].detach().to("cpu")
            out[moment_key(m, hf)] = (t.t() if transpose else t).contiguous()
        step = float(st["step"])
    if step is not None:
        out[STEP_KEY] = torch.tensor(step, dtype=torch.float64)
    return out


def load_stage_optimizer_state(module: StageModel, optimizer: torch.optim.Optimizer,
                               tensors: dict[str, torch.Tensor]) -> int:
    """Set the optimizer's state of ``module``'s parameters from HF-named ``tensors`` (extra
    tensors of other stages are ignored); returns the step count restored.

    Raises InvalidRequestError when a parameter's moments are missing or have the wrong shape
    (a partial state would mix restarted and restored moments).
    """
    if STEP_KEY not in tensors:
        raise InvalidRequestError(f"optimizer state has no {STEP_KEY!r}")
    step = float(tensors[STEP_KEY])
    new: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for local, p in module.named_parameters():
        hf, transpose = local_to_hf(module.config, local, module.first_layer)
        st: dict[str, torch.Tensor] = {}
        for m in MOMENTS:
            t = tensors.get(moment_key(m, hf))
            if t is None:
                raise InvalidRequestError(f"optimizer state lacks {moment_key(m, hf)}; is it this model's checkpoint?")
            t = t.t() if transpose else t
            if tuple(t.shape) != tuple(p.shape):
                raise InvalidRequestError(f"optimizer state {moment_key(m, hf)} has shape {tuple(t.shape)}, "
                                          f"the parameter {tuple(p.shape)}")
            st[m] = t.to(device=p.device, dtype=p.dtype).contiguous().clone()
        # AdamW keeps its step as a float32 CPU tensor (foreach=False, not capturable)
        st["step"] = torch.tensor(step, dtype=torch.float32)
        new[p] = st
    for p, st in new.items():
        optimizer.state[p] = st
    return int(step)
