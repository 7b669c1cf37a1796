"""Map a stage's parameter names to HF checkpoint tensor names and back.

A stage names its layers locally (``layers.0`` is its first layer, whatever its global index);
HF names carry the global layer index. GPT-2's HF checkpoints store Conv1D weights as (in, out);
we hold them as ``nn.Linear`` (out, in), so those are transposed in both directions.
"""

from __future__ import annotations

import re

import torch

from swarm.errors import InvalidRequestError
from swarm.model.config import ModelConfig

_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _prefixes(config: ModelConfig) -> tuple[str, dict[str, str]]:
    """(layer prefix, top-level local -> HF names) for a family."""
    if config.family == "gpt2":
        return "transformer.h.", {
            "wte.weight": "transformer.wte.weight",
            "wpe.weight": "transformer.wpe.weight",
            "ln_f.weight": "transformer.ln_f.weight",
            "ln_f.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight",
        }
    return "model.layers.", {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


def embedding_hf_name(config: ModelConfig) -> str:
    return "transformer.wte.weight" if config.family == "gpt2" else "model.embed_tokens.weight"


def local_to_hf(config: ModelConfig, local_name: str, first_layer: int) -> tuple[str, bool]:
    """(HF name, whether the tensor is transposed between the two layouts)."""
    layer_prefix, top = _prefixes(config)
    m = _LAYER.match(local_name)
    if m:
        rest = m.group(2)
        transpose = config.family == "gpt2" and rest in _GPT2_CONV1D
        return f"{layer_prefix}{first_layer + int(m.group(1))}.{rest}", transpose
    if local_name in top:
        return top[local_name], False
    raise InvalidRequestError(f"parameter {local_name!r} has no HF name in a {config.family} model")


def hf_to_local(config: ModelConfig, hf_name: str, first_layer: int) -> tuple[str, bool] | None:
    """(local name, transpose) of an HF tensor for a stage starting at ``first_layer``, or None
    for a name that is not a model parameter (e.g. GPT-2's ``attn.bias`` masks)."""
    layer_prefix, top = _prefixes(config)
    if hf_name.startswith(layer_prefix):
        idx, _, rest = hf_name[len(layer_prefix):].partition(".")
        if rest in ("attn.bias", "attn.masked_bias") or rest.endswith("rotary_emb.inv_freq"):
            return None
        transpose = config.family == "gpt2" and rest in _GPT2_CONV1D
        return f"layers.{int(idx) - first_layer}.{rest}", transpose
    for local, hf in top.items():
        if hf == hf_name:
            return local, False
    return None


def layer_of(config: ModelConfig, hf_name: str) -> int | None:
    """The global layer index an HF tensor belongs to, or None for embeddings/head/final norm."""
    layer_prefix, _ = _prefixes(config)
    if hf_name.startswith(layer_prefix):
        return int(hf_name[len(layer_prefix):].partition(".")[0])
    return None


def needed_hf_names(
    config: ModelConfig, names: list[str], first_layer: int, last_layer: int, *, is_first: bool, is_last: bool
) -> list[str]:
    """The subset of a checkpoint's tensor ``names`` a stage needs (layers in range plus its ends).

    A tied last stage needs the embedding when the checkpoint has no ``lm_head.weight``.
    """
    layer_prefix, top = _prefixes(config)
    out = []
    for name in names:
        layer = layer_of(config, name)
        if layer is not None:
            if first_layer <= layer < last_layer and hf_to_local(config, name, first_layer) is not None:
                out.append(name)
            continue
        local = hf_to_local(config, name, first_layer)
        if local is None:
            continue
        if local[0] in ("wte.weight", "wpe.weight", "embed_tokens.weight") and is_first:
            out.append(name)
        elif local[0] in ("ln_f.weight", "ln_f.bias", "norm.weight", "lm_head.weight") and is_last:
            out.append(name)
    emb = embedding_hf_name(config)
    if is_last and "lm_head.weight" not in names and emb in names and emb not in out:
        out.append(emb)  # tied head: the last stage reads the embedding matrix
    return out


def stage_state_to_hf(config: ModelConfig, state: dict[str, torch.Tensor], first_layer: int) -> dict[str, torch.Tensor]:
    """A stage's ``state_dict()`` under HF names (contiguous tensors, same device and dtype)."""
    out = {}
    for local, t in state.items():
        hf, transpose = local_to_hf(config, local, first_layer)
        out[hf] = (t.t() if transpose else t).contiguous()
    return out


def hf_to_stage_state(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    first_layer: int,
    last_layer: int,
    *,
    is_first: bool,
    is_last: bool,
) -> dict[str, torch.Tensor]:
    """Pick and rename the HF tensors a stage needs into its local ``state_dict`` names."""
    out = {}
    for name in needed_hf_names(config, list(tensors), first_layer, last_layer, is_first=is_first, is_last=is_last):
        t = tensors[name]
        if name == embedding_hf_name(config) and is_last and "lm_head.weight" not in tensors:
            out["lm_head.weight"] = t
            if not is_first:
                continue
        local, transpose = hf_to_local(config, name, first_layer)
        out[local] = t.t() if transpose else t
    return out
