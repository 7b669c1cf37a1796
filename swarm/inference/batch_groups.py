"""Batch caches of a CPU stage's decoding sessions (StageRuntime without a slot cache).

A set of sessions that decode together (a group, keyed by their ids in row order) shares one
:class:`KVCache` whose rows are theirs, kept between steps while the set is unchanged, so steady
decoding copies no cache. A session is in one group at most: a step with another set dissolves
the groups its sessions were in (each row copied back into a cache of the session's own, or the
cache itself handed back when it held one session) and concatenates the new set. At most
:data:`MAX_GROUPS` are kept, least recently used dissolved first.

The runtime's sessions carry ``cache``: their own KVCache, or None while they are a row of a group.
On a GPU the slot cache (swarm/inference/slots.py) replaces all of this: there idle rows are
nearly free and fixed shapes let a CUDA graph replay. Not thread-safe: the runtime calls it
under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from swarm.inference.cache_pool import CachePool
from swarm.model.kv_cache import KVCache

MAX_GROUPS = 8  # batch caches kept at once; the least recently used goes first

Key = tuple[str, ...]


class BatchGroups:
    """The runtime's batch caches: ``caches`` (key -> cache, least recently used first)."""

    def __init__(self, sessions: Mapping, pool: CachePool, give: Callable[[KVCache], None]) -> None:
        """``sessions``: the runtime's (id -> session with a ``cache`` attribute); ``pool``: where
        copies of single rows come from; ``give``: hands back a cache nobody holds any more."""
        self._sessions = sessions
        self._pool = pool
        self._give = give
        self.caches: dict[Key, KVCache] = {}
        self._of: dict[str, Key] = {}

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.caches.values())

    def release(self, session_id: str) -> None:
        """Give a session that is a row of a group its own cache back (its group dissolves)."""
        if session_id in self._of:
            self._give_all(self._dissolve(self._of[session_id]))

    def closing(self, closed: set[str]) -> list[KVCache]:
        """Dissolve the groups of sessions about to close, dropping their rows; returns the caches
        nobody holds any more (to be given back once those sessions are gone)."""
        freed = []
        for sid in closed:
            if sid in self._of:
                freed += self._dissolve(self._of[sid], closing=closed)
        return freed

    def ensure(self, ids: list[str]) -> KVCache:
        """The batch cache of exactly these sessions in this order (kept, or built from their caches)."""
        key = tuple(ids)
        group = self.caches.get(key)
        if group is not None:
            self.caches[key] = self.caches.pop(key)  # most recently used
            return group
        for sid in ids:  # a session is in one batch cache at most
            self.release(sid)
        self._make_room()
        caches = []
        for sid in ids:
            s = self._sessions[sid]
            assert s.cache is not None
            caches.append(s.cache)
            s.cache = None
            self._of[sid] = key
        if len(caches) == 1:
            group = caches[0]
        else:
            group = KVCache.cat(caches, out=self._pool.take(len(caches)))
            self._give_all(caches)
        self.caches[key] = group
        return group

    def adopt(self, ids: list[str], cache: KVCache) -> None:
        """Keep ``cache`` (sessions prefilled together, one row each, in this order) as their group:
        a next step that decodes exactly these sessions copies no cache."""
        self._make_room()
        key = tuple(ids)
        for sid in ids:
            self._sessions[sid].cache = None  # its row of the batch cache
            self._of[sid] = key
        self.caches[key] = cache

    def _make_room(self) -> None:
        while len(self.caches) >= MAX_GROUPS:
            self._give_all(self._dissolve(next(iter(self.caches))))

    def _dissolve(self, key: Key, closing: set[str] = frozenset()) -> list[KVCache]:
        """Move every row of a batch cache back into its session's own cache (rows of sessions
        in ``closing`` are dropped). Returns the caches no session holds any more."""
        group = self.caches.pop(key, None)
        if group is None:
            return []
        keeps = False
        for row, sid in enumerate(key):
            self._of.pop(sid, None)
            s = self._sessions.get(sid)
            if s is not None and sid not in closing and s.cache is None:
                if len(key) > 1:
                    with torch.inference_mode():  # copies into a spare cache (an inference tensor)
                        s.cache = group.select([row], out=self._pool.take(1))
                else:
                    s.cache, keeps = group, True
        return [] if keeps else [group]

    def _give_all(self, caches: list[KVCache]) -> None:
        for cache in caches:
            self._give(cache)
