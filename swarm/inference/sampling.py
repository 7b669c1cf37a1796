"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

Sampling is deterministic given (seed, position): the random draw for the token at absolute
position ``p`` of a session uses a generator seeded from ``(seed, p)`` alone. So a session
that is replayed on another replica after a failure draws exactly the same tokens, and a
batch of sessions samples the same as each session alone.
"""

from __future__ import annotations

import torch

# SamplingParams lives in a torch-free module (the CLI imports it); re-exported here.
from swarm.inference.params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams  # noqa: F401

_MASK64 = (1 << 63) - 1


def _position_seed(seed: int, position: int) -> int:
    # splitmix64-style mixing so nearby (seed, position) pairs give unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits (V,) with everything outside top-k / top-p set to -inf."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= params.top_p
        x = x.clone()
        x[order[drop]] = float("-inf")
    return x


def sample_token(logits: torch.Tensor, params: SamplingParams, *, position: int) -> int:
    """The token for absolute ``position`` of a session from its logits (V,)."""
    if logits.dim() != 1:
        raise ValueError(f"expected logits of shape (V,), got {tuple(logits.shape)}")
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_position_seed(params.seed, position))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of ``logits`` (B, V); greedy rows share one argmax."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError("sample_batch needs logits (B, V) and one params/position per row")
    out = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        ids = torch.argmax(logits[greedy_rows], dim=-1).tolist()
        for i, t in zip(greedy_rows, ids):
            out[i] = int(t)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_token(logits[i], p, position=positions[i])
    return out


def find_stop(text: str, stop: tuple[str, ...], *, search_from: int = 0) -> int | None:
    """Index where the first stop string starts in ``text`` (looking from ``search_from``,
    minus the longest stop string so matches across token boundaries are found), or None."""
    if not stop:
        return None
    start = max(0, search_from - max(len(s) for s in stop) + 1)
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None
