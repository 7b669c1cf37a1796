"""CachePool: spare caches come back empty, the same objects, within the row bound."""

from __future__ import annotations

import pytest
import torch

from swarm.inference.cache_pool import CachePool
from swarm.model.config import ModelConfig
from swarm.model.kv_cache import KVCache

pytestmark = pytest.mark.timeout(30)


def _pool(max_rows: int) -> tuple[CachePool, list[KVCache]]:
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                      max_position_embeddings=32)
    made: list[KVCache] = []

    def new(b: int) -> KVCache:
        made.append(KVCache(cfg, 2, batch_size=b, max_length=8))
        return made[-1]

    return CachePool(new, max_rows=max_rows), made


def test_a_given_cache_comes_back_emptied_in_place():
    pool, made = _pool(4)
    c = pool.take(1)
    keys = c.keys[0]
    c.keys[0].fill_(3.0)
    c.lengths.fill_(5)
    assert pool.give(c, open_sessions=1)
    again = pool.take(1)
    assert again is c and len(made) == 1
    assert again.keys[0] is keys  # the same tensors: a graph over them stays valid
    assert torch.count_nonzero(again.keys[0]) == 0 and int(again.lengths.sum()) == 0
    assert pool.take(2) is not c and len(made) == 2  # another batch size: a new one


def test_spare_rows_and_open_sessions_stay_within_the_bound():
    pool, _ = _pool(4)
    a, b, c = pool.take(1), pool.take(2), pool.take(2)
    assert pool.give(b, open_sessions=1)  # 2 spare + 1 open
    assert not pool.give(c, open_sessions=1)  # 4 spare + 1 open > 4: dropped
    assert pool.give(a, open_sessions=1)  # 3 spare + 1 open
    assert pool.rows == 3 and pool.count() == 2 and pool.count(2) == 1
    assert pool.nbytes() == a.nbytes() + b.nbytes()
    pool.clear()
    assert pool.rows == 0 and pool.nbytes() == 0
