"""Every session of a GPU stage in one KV cache of fixed rows (slots), so that a decode step has
the same shapes whichever sessions take part, and one CUDA graph per batch size replays it.

Why: with a batch cache per set of sessions (StageRuntime's groups, the CPU path), every change
of that set (a session joins, finishes, or sits a step out, as one held for a spot check may)
copied the rows into a new cache, ran its first step eagerly and recorded a new graph on the next.
Measured on the H200 with spot checks off, same call: 8 sessions on 4 stages 750 -> 970 tok/s,
1 session 6.51 -> 5.67 ms per token (docs/benchmarks.md, issue 16).

Layout: one :class:`KVCache` of ``capacity`` rows and ``max_seq_len + 1`` positions. A session
holds one row from its first step to its close (the lowest free row), so a step copies no cache.
A decode step runs over the first ``bucket`` rows (the smallest power of two that covers every
row taking part, at most ``capacity``): rows taking part advance, the others compute too and
write their keys and values at their length, which is past their filled positions (a later step
overwrites it) or, for a full row, the scratch position ``max_seq_len`` that no session reaches.
Idle rows cost little: at the batch sizes served a decode step is bound by reading the weights.

Capacity grows by doubling (rows moved one layer at a time, so the old and the new cache are never
held whole together; graphs recorded again) up to the runtime's ``max_sessions``, starting at
:data:`FIRST_CAPACITY`; an idle stage drops the cache. Not
thread-safe: the runtime calls it under its lock.
"""

from __future__ import annotations

import os

import torch

from swarm.errors import CapacityError
from swarm.inference.graphs import DecodeGraphs
from swarm.model.kv_cache import KVCache
from swarm.model.stage import StageModel

FIRST_CAPACITY = 8
MAX_INDEX_SETS = 8  # sets of rows whose device index tensors are kept (:meth:`SlotCache.decode`)


def slots_wanted(device: torch.device) -> bool:
    """Whether a stage on ``device`` keeps its sessions in a slot cache: on CUDA, unless
    ``SWARM_SLOT_CACHE=0``; elsewhere only with ``SWARM_SLOT_CACHE=1`` (tests run the GPU layout
    through real node processes on a CPU that way)."""
    flag = os.environ.get("SWARM_SLOT_CACHE", "")
    return flag == "1" if flag in ("0", "1") else device.type == "cuda"


def bucket(rows_needed: int, capacity: int) -> int:
    """The number of rows a step over rows ``[0, rows_needed)`` runs: a power of two, at most
    ``capacity`` (so a handful of graphs cover every mix of sessions)."""
    b = 1
    while b < rows_needed:
        b *= 2
    return min(b, capacity)


class SlotCache:
    """Rows of one growing KV cache of ``stage`` handed to sessions, and the decode steps over
    buckets of them (CUDA graphs with ``graphs``, else ``decode_fixed`` run eagerly)."""

    def __init__(self, stage: StageModel, *, max_rows: int, max_seq_len: int, graphs: bool) -> None:
        self.stage = stage
        self.max_rows = max_rows
        self.max_seq_len = max_seq_len
        p = next(stage.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.graphs = DecodeGraphs(stage) if graphs else None
        self.cache: KVCache | None = None
        self._free: list[int] = []  # free rows, kept sorted: the lowest is taken first
        self._views: dict[int, KVCache] = {}
        self._indices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (b, rows) -> (active, rows)

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.batch_size

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    def take(self) -> int:
        """A free row, emptied (zeros, length 0); grows the cache when none is free. Raises
        CapacityError at ``max_rows`` rows in use."""
        if not self._free:
            self._grow()
        row = self._free.pop(0)
        c = self.cache
        assert c is not None
        with torch.inference_mode():  # the runtime's caches are inference tensors
            for t in c.keys + c.values:
                t[row].zero_()
            c.lengths[row] = 0
        return row

    def give(self, row: int) -> None:
        """Free a row (its contents stay until the next :meth:`take` of it empties them)."""
        if 0 <= row < self.capacity and row not in self._free:
            self._free.append(row)
            self._free.sort()

    def put(self, row: int, src: KVCache, src_row: int, length: int) -> None:
        """Copy positions ``[0, length)`` of ``src``'s row ``src_row`` into ``row``, which then
        holds ``length`` positions (a batch prefilled together lands in its sessions' rows)."""
        c = self.cache
        assert c is not None
        for dst, t in zip(c.keys + c.values, src.keys + src.values):
            dst[row, :, :length] = t[src_row, :, :length]
        c.lengths[row] = length

    def view(self, rows_needed: int) -> KVCache:
        """The cache's first ``bucket(rows_needed)`` rows, the same object every time (a CUDA graph
        recorded over it replays while the object lives; growing the cache drops every view)."""
        assert self.cache is not None
        b = bucket(rows_needed, self.capacity)
        v = self._views.get(b)
        if v is None:
            v = self._views[b] = self.cache if b == self.capacity else self.cache.rows(0, b)
        return v

    def row(self, row: int) -> KVCache:
        """One row as a cache of its own (views): a prefill of that session runs through it."""
        assert self.cache is not None
        return self.cache.rows(row, row + 1)

    def decode(self, rows: list[int], tokens: list[int] | None, hidden: torch.Tensor | None,
               offsets: list[int]) -> torch.Tensor:
        """One decode step of the sessions in ``rows`` (each takes one token: ``tokens`` on the
        first stage, else row ``offsets[j]`` of ``hidden``, on the device) over the smallest
        bucket of rows that holds them all: (len(rows), 1, H|V), in ``rows``'s order.

        The hot path of a GPU stage, so it does little besides the replay: the tokens go to the
        device in one copy, already in row order; the active rows and gather indices are device
        tensors kept per set of rows (steady decoding reuses them); when the sessions fill the
        bucket in row order (the usual case) the input is the hidden states as they came and the
        output the graph's (valid until the next step), with no gather or scatter at all."""
        view = self.view(max(rows) + 1)
        b, n = view.batch_size, len(rows)
        dense = n == b and rows == list(range(b))  # every row of the bucket takes part, in row order
        active, idx = self._row_indices(b, rows)
        if tokens is not None:
            toks = [0] * b
            for r, t in zip(rows, tokens):
                toks[r] = t
            x = torch.tensor(toks, dtype=torch.long).view(b, 1).to(self.device)
        elif dense and offsets == list(range(n)):
            x = hidden[:n].unsqueeze(1)  # (b, 1, H)
        else:
            x = torch.zeros((b, 1, hidden.shape[-1]), dtype=self.dtype, device=self.device)
            at = torch.tensor(offsets, dtype=torch.long).to(self.device)
            x.index_copy_(0, idx, hidden.index_select(0, at)[:, None, :])
        y = self.graphs.step(view, x, active) if self.graphs is not None else None
        if y is None:
            y = self.stage.decode_fixed(x, view, active)
        return y if dense else y.index_select(0, idx)

    def _row_indices(self, b: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(active (b,) 0/1, rows (n,)) on the device for a step of ``rows`` over ``b`` rows; kept
        for the most recent sets of rows, so steady decoding copies nothing for them."""
        key = (b, tuple(rows))
        got = self._indices.get(key)
        if got is None:
            if len(self._indices) >= MAX_INDEX_SETS:
                self._indices.pop(next(iter(self._indices)))
            active = torch.zeros(b, dtype=torch.long)
            active[rows] = 1
            got = self._indices[key] = (active.to(self.device), torch.tensor(rows, dtype=torch.long).to(self.device))
        return got

    def clear(self) -> None:
        """Drop the cache (an idle stage gives its memory back); rows in use are the caller's to
        have closed first."""
        self.cache, self._free, self._views = None, [], {}

    def _grow(self) -> None:
        old = self.capacity
        if old >= self.max_rows:
            raise CapacityError(f"stage holds its maximum of {self.max_rows} sessions; retry later or add a replica")
        cap = min(max(FIRST_CAPACITY, 2 * old), self.max_rows)
        self._views = {}  # they hold the old tensors (and their graphs are dropped with them)
        if self.cache is None:
            self.cache = KVCache(self.stage.config, self.stage.num_layers, batch_size=cap, max_length=self.max_seq_len,
                                 device=self.device, dtype=self.dtype, scratch_positions=1)
        else:
            with torch.inference_mode():
                self.cache = self.cache.moved_to_rows(cap)  # one layer at a time: no second whole cache
        self._free = sorted(set(self._free) | set(range(old, cap)))
