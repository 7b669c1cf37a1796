"""Decoder-only transformers (GPT-2 and Llama families) that split into pipeline stages.

- :class:`ModelConfig` -- the model's shape, to and from HF ``config.json``.
- :func:`build_stage` / :class:`StageModel` -- layers ``[first, last)``; stage 0 owns the
  embeddings, the last stage the final norm and LM head; the whole model is one stage.
- :class:`KVCache` -- per-stage key/value cache for generation, rows = sessions.
- :func:`load_checkpoint`, :func:`load_stage`, :func:`save_checkpoint` -- HF safetensors IO that
  reads only the tensors a stage needs; :mod:`swarm.model.hf_names` maps names.
- :func:`load_tokenizer` -- ``tokenizer.json`` via `tokenizers`, byte-level fallback.
- :mod:`swarm.model.testing` -- tiny real checkpoints (with a trained BPE) for tests.
"""

from swarm.model.checkpoint import Checkpoint, load_checkpoint, load_config, load_stage, save_checkpoint
from swarm.model.config import ModelConfig
from swarm.model.hf_names import hf_to_stage_state, stage_state_to_hf
from swarm.model.kv_cache import KVCache
from swarm.model.stage import StageModel, build_stage, init_weights
from swarm.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "Checkpoint",
    "HFTokenizer",
    "KVCache",
    "ModelConfig",
    "StageModel",
    "build_stage",
    "hf_to_stage_state",
    "init_weights",
    "load_checkpoint",
    "load_config",
    "load_stage",
    "load_tokenizer",
    "save_checkpoint",
    "stage_state_to_hf",
]
