"""What placement needs to know about a served model: bytes and FLOPs from its config and dtype."""

from __future__ import annotations

from swarm.model.config import ModelConfig
from swarm.scheduling.placement import ModelShape

from coordinator.inference.store import ServeParams

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_shape(config: ModelConfig, params: ServeParams) -> ModelShape:
    """Bytes and FLOPs placement needs, from the model config and the serving dtype."""
    b = _DTYPE_BYTES[params.dtype]
    body = config.num_parameters(include_embeddings=False)
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    per_layer = max(1, (body - head) // config.num_layers)
    emb = config.num_parameters() - body
    return ModelShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        layer_bytes=per_layer * b,
        embed_bytes=emb * b,
        head_bytes=(head or config.vocab_size * config.hidden_size) * b,
        kv_bytes_per_token_per_layer=2 * config.num_kv_heads * config.head_dim * b,
        flops_per_token_per_layer=2.0 * per_layer,
        activation_bytes_per_token=config.hidden_size * (1 if params.hidden_codec in ("int8", "auto") else 4),
    )
