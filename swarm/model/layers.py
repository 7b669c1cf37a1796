"""Transformer blocks of the GPT-2 and Llama families, written to read like the math.

Parameter names inside a block follow the HF checkpoints (``attn.c_attn``, ``self_attn.q_proj``...)
so :mod:`swarm.model.hf_names` maps them with a prefix; GPT-2's Conv1D weights are stored here as
``nn.Linear`` (out, in) and transposed on the way in and out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swarm.model.config import ModelConfig
from swarm.model.kv_cache import CacheStep, KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # unit RMS, in fp32
        return self.weight * x32.to(dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, head_dim) of the rotary embedding at integer ``positions`` (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): the two halves rotate together
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, heads, T, head_dim) by position; cos/sin are (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_cache: KVCache | None,
    layer: int,
    step: CacheStep | None,
) -> torch.Tensor:
    """Causal attention. q (B, h, T, d); k, v (B, kv, T, d) for the new tokens. Returns (B, h, T, d).

    Without a cache the T tokens attend causally among themselves. With one, the new keys are
    written at each row's cache length and the queries attend to the filled positions up to
    their own: the first ``step.kv_len`` cache positions (the longest row), masked per row by
    ``step.mask`` -- never the whole preallocated cache.
    """
    B, h, T, d = q.shape
    if kv_cache is None:
        mask, causal = None, True
    else:
        assert step is not None, "a cached pass needs its CacheStep (KVCache.begin_step)"
        k, v = kv_cache.update(layer, k, v, kv_len=step.kv_len)  # (B, kv, kv_len, d)
        mask, causal = step.mask, False
    n_rep = h // k.shape[1]
    if n_rep > 1:  # grouped-query attention: query head i reads kv head i // n_rep
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0 / math.sqrt(d))


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, *, kv_cache, layer, step):
        B, T, H = x.shape
        nh, hd = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = self.c_attn(x).split(H, dim=2)  # 3 x (B, T, H)
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = attend(q, k, v, kv_cache=kv_cache, layer=layer, step=step)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, *, kv_cache, layer, step, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache, layer=layer, step=step)
        return x + self.mlp(self.ln_2(x))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, *, kv_cache, layer, step, rope):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.num_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.cfg.num_kv_heads, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.cfg.num_kv_heads, hd).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend(q, k, v, kv_cache=kv_cache, layer=layer, step=step)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, *, kv_cache, layer, step, rope):
        x = x + self.self_attn(self.input_layernorm(x), kv_cache=kv_cache, layer=layer, step=step, rope=rope)
        return x + self.mlp(self.post_attention_layernorm(x))
