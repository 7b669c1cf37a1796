"""The shape of a decoder-only transformer, and its translation to and from HF ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from swarm.errors import ConfigError

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """A GPT-2 or Llama-family decoder.

    ``family`` picks the block: "gpt2" (learned positions, LayerNorm with bias, fused QKV, GELU-tanh
    MLP) or "llama" (rotary positions, RMSNorm, grouped-query attention, SwiGLU MLP, no biases).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    intermediate_size: int | None = None  # None: 4 * hidden_size
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # llama only (gpt2 always has biases)
    mlp_bias: bool = False  # llama only
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model family {self.family!r} is not supported; use one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config {name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.family == "gpt2":
            if self.num_kv_heads != self.num_heads:
                raise ConfigError("gpt2 models have no grouped-query attention: num_kv_heads must equal num_heads")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ConfigError("gpt2 models need head_dim * num_heads == hidden_size")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (rotary embeddings), got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    # -- derived sizes ---------------------------------------------------------------------------
    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameter count of the whole model (tied embeddings counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if self.family == "gpt2":
            per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
            emb = self.vocab_size * h + self.max_position_embeddings * h
            final = 2 * h
        else:
            bias = (q + 2 * kv + h) if self.attention_bias else 0
            mlp_b = (2 * i + h) if self.mlp_bias else 0
            per_layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + mlp_b + 2 * h
            emb = self.vocab_size * h
            final = h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = self.num_layers * per_layer + final + head
        return total + (emb if include_embeddings else 0)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- HF config.json ----------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read an HF ``config.json`` dict (model_type "gpt2" or "llama"). Raises ConfigError."""
        model_type = hf.get("model_type")
        try:
            if model_type == "gpt2":
                if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
                    raise ConfigError("gpt2 variants with scale_attn_by_inverse_layer_idx or cross-attention are not supported")
                act = hf.get("activation_function", "gelu_new")
                if act not in ("gelu_new", "gelu_pytorch_tanh"):
                    raise ConfigError(f"gpt2 activation {act!r} is not supported; only gelu_new")
                return cls(
                    family="gpt2",
                    vocab_size=int(hf["vocab_size"]),
                    hidden_size=int(hf["n_embd"]),
                    num_layers=int(hf["n_layer"]),
                    num_heads=int(hf["n_head"]),
                    intermediate_size=int(hf["n_inner"]) if hf.get("n_inner") else None,
                    max_position_embeddings=int(hf.get("n_positions", 1024)),
                    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                    tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                    bos_token_id=_opt_int(hf.get("bos_token_id")),
                    eos_token_id=_opt_int(hf.get("eos_token_id")),
                )
            if model_type == "llama":
                rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
                rope_type = rope.get("rope_type", rope.get("type", "default"))
                if rope_type != "default":
                    raise ConfigError(f"llama rope_type {rope_type!r} is not supported; only default rotary")
                theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
                act = hf.get("hidden_act", "silu")
                if act != "silu":
                    raise ConfigError(f"llama hidden_act {act!r} is not supported; only silu")
                return cls(
                    family="llama",
                    vocab_size=int(hf["vocab_size"]),
                    hidden_size=int(hf["hidden_size"]),
                    num_layers=int(hf["num_hidden_layers"]),
                    num_heads=int(hf["num_attention_heads"]),
                    num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                    intermediate_size=int(hf["intermediate_size"]),
                    head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
                    max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    rope_theta=float(theta),
                    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    attention_bias=bool(hf.get("attention_bias", False)),
                    mlp_bias=bool(hf.get("mlp_bias", False)),
                    bos_token_id=_opt_int(hf.get("bos_token_id")),
                    eos_token_id=_opt_int(hf.get("eos_token_id")),
                )
        except KeyError as exc:
            raise ConfigError(f"config.json of model_type {model_type!r} lacks the field {exc.args[0]!r}") from exc
        raise ConfigError(f"config.json model_type {model_type!r} is not supported; use a gpt2 or llama model")

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that ``transformers`` loads as the same model."""
        if self.family == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "scale_attn_weights": True,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }


def _opt_int(v: Any) -> int | None:
    if v is None or isinstance(v, list):  # some configs list several eos ids; we keep none
        return None
    return int(v)
