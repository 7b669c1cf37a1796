"""The model a training job starts from: config + HF-named tensors, prepared once per job.

Tied input/output embeddings are untied for pipeline training: the first stage holds the token
embedding and the last stage its own copy as ``lm_head.weight``, and each trains its copy (a
tied model split across nodes would need both gradients summed across the pipeline every step).
The exported checkpoint says ``tie_word_embeddings: false`` accordingly; ``transformers``
loads it as is. The single-process reference trainer starts from the same prepared model.
"""

from __future__ import annotations

import torch

from swarm.model.config import ModelConfig
from swarm.model.hf_names import embedding_hf_name
from swarm.model.stage import build_stage


def init_tensors(config: ModelConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialised weights of the whole model (seeded), under HF names."""
    return build_stage(config, 0, config.num_layers, seed=seed).hf_state_dict()


def untie(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(untied config, tensors with an explicit ``lm_head.weight``); unchanged when already untied."""
    if not config.tie_word_embeddings:
        return config, tensors
    out = dict(tensors)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out[embedding_hf_name(config)].detach().clone()
    return config.replace(tie_word_embeddings=False), out


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal layer ranges ``[first, last)`` (earlier stages get the extra layers)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        out.append((start, start + n))
        start += n
    return out
