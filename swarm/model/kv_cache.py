"""Key/value caches for generation: one per stage, rows are sessions that may have different lengths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.errors import CapacityError, InvalidRequestError
from swarm.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class CacheStep:
    """What every layer of one cached forward pass shares (built once per pass, not per layer).

    ``kv_len``: the queries read cache positions ``[0, kv_len)`` only, where kv_len is the longest
    row's length after this pass, not the preallocated ``max_length``. ``mask`` (B, 1, T, kv_len)
    bool: which of those positions each query may read (shorter rows, causality among the new
    tokens); None when every query reads all of them (T == 1 and all rows of equal length).
    """

    kv_len: int
    mask: torch.Tensor | None


class KVCache:
    """The keys and values of one stage's layers for ``batch_size`` sessions (rows).

    Layout per layer: ``keys[i]`` and ``values[i]`` of shape (B, num_kv_heads, max_length, head_dim),
    preallocated. ``lengths`` (B,) int64 says how many positions of each row are filled; a forward
    pass with T new tokens writes positions ``lengths[b] .. lengths[b] + T - 1`` of row b, attends
    to everything before, and then advances ``lengths`` by T. Rows of different lengths can step
    together (batched decoding of several sessions). Combine sessions with :meth:`cat`, split them
    with :meth:`select`.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_layers: int,
        *,
        batch_size: int,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        scratch_positions: int = 0,
    ) -> None:
        """``scratch_positions``: that many more positions allocated past ``max_length``, never
        attended to and never counted as room, for writes that must land somewhere harmless: the
        idle full rows of a fixed-shape decode step (swarm/inference/slots.py). Attention spans
        stay within ``max_length``: with the scratch position inside a 257-position span, a
        12-layer step on the H200 ran ~0.2 ms slower than with 256 (likely the memory-efficient
        kernel padding an unaligned mask; not isolated)."""
        if batch_size <= 0 or max_length <= 0 or num_layers < 0:
            raise InvalidRequestError(
                f"KV cache needs positive batch_size and max_length (got {batch_size}, {max_length})"
            )
        if max_length > config.max_position_embeddings:
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}; ask for a shorter generation"
            )
        if scratch_positions < 0:
            raise InvalidRequestError("scratch_positions must be >= 0")
        shape = (batch_size, config.num_kv_heads, max_length + scratch_positions, config.head_dim)
        self.config = config
        self.max_length = max_length
        self.scratch_positions = scratch_positions
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        """Memory held by the cache tensors."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def bytes_per_token(config: ModelConfig, num_layers: int, dtype: torch.dtype = torch.float16) -> int:
        """Cache bytes one token of one session needs on a stage of ``num_layers`` layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * config.num_kv_heads * config.head_dim * itemsize

    def check_room(self, num_new_tokens: int) -> int:
        """Raise CapacityError unless every row can take ``num_new_tokens`` more; returns the
        longest row's length (before the new tokens)."""
        longest = int(self.lengths.max().item()) if self.batch_size else 0
        if longest + num_new_tokens > self.max_length:
            raise CapacityError(
                f"KV cache is full: a session at {longest} tokens cannot take {num_new_tokens} more "
                f"(max_length {self.max_length}); start a new session with a larger max_length"
            )
        return longest

    def begin_step(self, positions: torch.Tensor) -> CacheStep:
        """Check room for the new tokens at ``positions`` (B, T) (= lengths[:, None] + arange(T))
        and build the pass's :class:`CacheStep`. Costs O(B * T * kv_len), once per pass."""
        B, T = positions.shape
        longest = self.check_room(T)
        kv_len = longest + T
        shortest = int(self.lengths.min().item()) if B else 0
        if T == 1 and shortest == longest:
            return CacheStep(kv_len=kv_len, mask=None)  # every row reads all kv_len positions
        key_pos = torch.arange(kv_len, device=positions.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, kv_len)
        return CacheStep(kv_len=kv_len, mask=mask)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, kv_heads, T, head_dim) of ``layer`` at each row's length.

        Returns views of the key and value buffers (B, kv_heads, kv_len, head_dim) (the whole
        ``max_length`` when kv_len is None); positions at or past a row's ``lengths + T`` hold
        stale data that the caller masks. Does not advance lengths.
        """
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise InvalidRequestError(f"batch of {B} rows does not match the KV cache's {self.batch_size} sessions")
        pos = self.lengths[:, None] + torch.arange(T, device=k.device)[None, :]  # (B, T)
        idx = pos[:, None, :, None].expand(B, k.shape[1], T, k.shape[3])
        self.keys[layer].scatter_(2, idx, k.to(self.keys[layer].dtype))
        self.values[layer].scatter_(2, idx, v.to(self.values[layer].dtype))
        if kv_len is None:
            return self.keys[layer], self.values[layer]
        return self.keys[layer][:, :, :kv_len], self.values[layer][:, :, :kv_len]

    def advance(self, num_new_tokens: int) -> None:
        self.lengths += num_new_tokens

    def export_row(self, row: int, length: int) -> torch.Tensor:
        """A copy of positions ``[0, length)`` of row ``row``: every layer's K then V, shape
        (layers, 2, kv_heads, length, head_dim) (the layout a KV hand-off moves)."""
        return torch.stack([torch.stack([k[row, :, :length], v[row, :, :length]])
                            for k, v in zip(self.keys, self.values)])

    def reset(self) -> None:
        """Empty every row in place (zeros, as a new cache), keeping the tensors: a CUDA graph
        recorded over this cache (swarm/inference/graphs.py) stays valid for its next sessions."""
        for t in self.keys + self.values:
            t.zero_()
        self.lengths.zero_()

    def select(self, rows: list[int] | torch.Tensor, out: "KVCache | None" = None) -> "KVCache":
        """A cache holding copies of the given rows (sessions), in that order: ``out`` (an empty
        cache of as many rows, e.g. a reused one) or a new one.

        Copies only the filled positions (up to the longest selected row), not ``max_length``."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        lengths = self.lengths.index_select(0, rows_t)
        out = self._check_out(out, len(lengths)) if out is not None else self._empty_like(len(lengths))
        n = int(lengths.max().item()) if len(lengths) else 0
        for dst, src in zip(out.keys + out.values, self.keys + self.values):
            dst[:, :, :n] = src[:, :, :n].index_select(0, rows_t)
        out.lengths.copy_(lengths)  # in place: a graph over ``out`` reads this tensor
        return out

    @staticmethod
    def cat(caches: list["KVCache"], out: "KVCache | None" = None) -> "KVCache":
        """Stack sessions of several caches (same stage, same max_length) into one batch: into
        ``out`` (an empty cache of as many rows in all) or a new one.

        Copies only each cache's filled positions (up to its longest row), not ``max_length``."""
        if not caches:
            raise InvalidRequestError("cannot concatenate an empty list of KV caches")
        first = caches[0]
        if any(c.max_length != first.max_length or c.num_layers != first.num_layers for c in caches):
            raise InvalidRequestError("KV caches to batch together need the same max_length and layer count")
        rows = sum(c.batch_size for c in caches)
        out = first._check_out(out, rows) if out is not None else first._empty_like(rows)
        row = 0
        for c in caches:
            n = int(c.lengths.max().item()) if c.batch_size else 0
            for dst, src in zip(out.keys + out.values, c.keys + c.values):
                dst[row : row + c.batch_size, :, :n] = src[:, :, :n]
            row += c.batch_size
        out.lengths.copy_(torch.cat([c.lengths for c in caches]))
        return out

    def moved_to_rows(self, batch_size: int) -> "KVCache":
        """A cache of ``batch_size`` rows (at least this one's): this one's rows first, zeros after.
        Built one layer at a time while this cache gives its tensors up, so the memory held at once
        is the new cache and one layer of this one, not both caches (an allocation that does not fit
        makes torch's allocator free the blocks given up and retry). This cache holds no layers
        afterwards; views of it must be dropped first, or they keep its memory."""
        if batch_size < self.batch_size:
            raise InvalidRequestError(f"cannot move a KV cache of {self.batch_size} rows into {batch_size}")
        out = self._shell()
        out.keys, out.values = [], []
        n = self.batch_size
        for src, dst in ((self.keys, out.keys), (self.values, out.values)):
            while src:
                t = src.pop(0)
                grown = torch.zeros((batch_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
                grown[:n].copy_(t)
                dst.append(grown)
                del t
        out.lengths = torch.zeros(batch_size, dtype=self.lengths.dtype, device=self.lengths.device)
        out.lengths[:n].copy_(self.lengths)
        return out

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows ``[start, stop)`` as a cache that shares this one's memory (views): what a step
        writes through it, lengths included, lands here."""
        if not 0 <= start < stop <= self.batch_size:
            raise InvalidRequestError(f"rows [{start}, {stop}) of a KV cache of {self.batch_size}")
        out = self._shell()
        out.keys = [k[start:stop] for k in self.keys]
        out.values = [v[start:stop] for v in self.values]
        out.lengths = self.lengths[start:stop]
        return out

    def _shell(self) -> "KVCache":
        """A cache object with this one's config, length and scratch positions, and no tensors yet."""
        out = KVCache.__new__(KVCache)
        out.config, out.max_length, out.scratch_positions = self.config, self.max_length, self.scratch_positions
        return out

    def _check_out(self, out: "KVCache", batch_size: int) -> "KVCache":
        if (out.batch_size != batch_size or out.max_length != self.max_length or out.num_layers != self.num_layers
                or (self.keys and out.keys[0].shape[1:] != self.keys[0].shape[1:])):
            raise InvalidRequestError("the KV cache to copy into has another shape")
        return out

    def _empty_like(self, batch_size: int) -> "KVCache":
        """A zeroed cache of ``batch_size`` rows with this one's layers, length, device and dtype.
        Zeros, not garbage: shorter rows' unfilled positions are read with weight 0, and 0 * NaN
        would poison the batch."""
        out = self._shell()
        shape = (batch_size, *self.keys[0].shape[1:]) if self.keys else None
        out.keys = [torch.zeros(shape, dtype=k.dtype, device=k.device) for k in self.keys]
        out.values = [torch.zeros(shape, dtype=v.dtype, device=v.device) for v in self.values]
        out.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.lengths.device)
        return out
