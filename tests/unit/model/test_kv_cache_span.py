"""Cached attention reads only the filled part of the KV cache, not its preallocated length."""

from __future__ import annotations

import pytest
import torch

from swarm.model import ModelConfig, build_stage
from swarm.model.kv_cache import KVCache


def _config(family: str) -> ModelConfig:
    if family == "gpt2":
        return ModelConfig(family="gpt2", vocab_size=61, hidden_size=32, num_layers=3, num_heads=4,
                           max_position_embeddings=64, tie_word_embeddings=False)
    return ModelConfig(family="llama", vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False)


def _poisoned_step(model, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run one cached pass with NaN in every cache position past what it may read (the longest
    row after the pass): a read of any of them would turn outputs into NaN. Zeroed again after,
    as never-written positions are (shorter rows do read those, with weight 0)."""
    kv_len = int(cache.lengths.max()) + x.shape[1]
    for t in cache.keys + cache.values:
        t[:, :, kv_len:] = float("nan")
    y = model(x, kv_cache=cache)
    for t in cache.keys + cache.values:
        t[:, :, kv_len:] = 0.0
    return y


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_decode_reads_only_up_to_the_longest_row(family):
    model = build_stage(_config(family), 0, 3, seed=11)
    a = torch.randint(0, 61, (1, 10), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ca, cb = model.new_kv_cache(batch_size=1, max_length=48), model.new_kv_cache(batch_size=1, max_length=48)
        model(a[:, :7], kv_cache=ca)
        model(b[:, :1], kv_cache=cb)
        both = KVCache.cat([ca, cb])  # rows at 7 and 1 tokens
        outs = []
        for t in range(3):  # three decode steps of both rows at once
            outs.append(_poisoned_step(model, torch.stack([a[:, 7 + t], b[:, 1 + t]]).view(2, 1), both))
        want_a, want_b = model(a[:, :10]), model(b[:, :4])
    got = torch.cat(outs, dim=1)  # (2, 3, V)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want_a[0, 7:10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want_b[0, 1:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equal_length_rows_and_chunked_prefill_read_only_the_filled_part(family):
    model = build_stage(_config(family), 0, 3, seed=12)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_kv_cache(batch_size=2, max_length=40)
        outs = []
        for lo, hi in [(0, 5), (5, 6), (6, 9), (9, 10)]:  # prefill, one token (no mask), a chunk, one token
            outs.append(_poisoned_step(model, ids[:, lo:hi], cache))
        want = model(ids[:, :10])
    torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=1e-5, rtol=1e-5)


def test_cat_and_select_copy_the_filled_rows_and_zero_the_rest():
    model = build_stage(_config("gpt2"), 0, 3, seed=13)
    with torch.no_grad():
        ca, cb = model.new_kv_cache(batch_size=1, max_length=32), model.new_kv_cache(batch_size=1, max_length=32)
        model(torch.arange(1, 9)[None], kv_cache=ca)
        model(torch.arange(2, 5)[None], kv_cache=cb)
    both = KVCache.cat([ca, cb])
    assert both.lengths.tolist() == [8, 3] and both.max_length == 32 and both.num_layers == 3
    back_b, back_a = both.select([1]), both.select([0])
    for got, src in ((back_a, ca), (back_b, cb)):
        n = int(src.lengths[0])
        for g, s in zip(got.keys + got.values, src.keys + src.values):
            assert g.shape == s.shape
            assert torch.equal(g[:, :, :n], s[:, :, :n])
            assert not g[:, :, n:].any()
    assert back_b.lengths.tolist() == [3]
