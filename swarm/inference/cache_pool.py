"""Emptied KV caches kept for a stage's next sessions (:class:`swarm.inference.stage_runtime.StageRuntime`).

A new session's cache then costs no allocation, and on a GPU the CUDA graph recorded over a cache
(swarm/inference/graphs.py, which holds the cache's tensors' addresses) replays for every session
the cache serves, from that session's first decode step. A cache comes back emptied in place
(:meth:`KVCache.reset`: zeros, as a new one), never reallocated.

Bound: the rows kept and the sessions open together stay within the runtime's ``max_sessions``,
the memory it may hold anyway; a cache over that is dropped. Not thread-safe: the runtime calls
it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from swarm.model.kv_cache import KVCache


class CachePool:
    """Spare caches by batch size; ``new(batch_size)`` allocates when none is spare."""

    def __init__(self, new: Callable[[int], KVCache], max_rows: int) -> None:
        self._new = new
        self.max_rows = max_rows
        self._spare: dict[int, list[KVCache]] = {}

    def take(self, batch_size: int) -> KVCache:
        """An empty cache of ``batch_size`` rows: a spare one (emptied) or a new one."""
        spare = self._spare.get(batch_size)
        if spare:
            cache = spare.pop()
            with torch.inference_mode():  # a runtime's caches are inference tensors
                cache.reset()
            return cache
        return self._new(batch_size)

    def give(self, cache: KVCache, *, open_sessions: int) -> bool:
        """Keep a cache no session uses any more, while the spare rows and ``open_sessions``
        together stay within ``max_rows``; else drop it. Returns whether it was kept."""
        if self.rows + cache.batch_size + open_sessions > self.max_rows:
            return False
        self._spare.setdefault(cache.batch_size, []).append(cache)
        return True

    @property
    def rows(self) -> int:
        return sum(b * len(caches) for b, caches in self._spare.items())

    def nbytes(self) -> int:
        return sum(c.nbytes() for caches in self._spare.values() for c in caches)

    def count(self, batch_size: int | None = None) -> int:
        """Spare caches (of ``batch_size`` rows, or all)."""
        if batch_size is not None:
            return len(self._spare.get(batch_size, ()))
        return sum(len(caches) for caches in self._spare.values())

    def holds(self, cache: KVCache) -> bool:
        return any(c is cache for caches in self._spare.values() for c in caches)

    def clear(self) -> None:
        self._spare.clear()
