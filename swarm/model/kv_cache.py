"""Key/value caches for generation: one per stage, rows are sessions that may have different lengths."""

from __future__ import annotations

import torch

from swarm.errors import CapacityError, InvalidRequestError
from swarm.model.config import ModelConfig


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
    ) -> None:
        if batch_size <= 0 or max_length <= 0 or num_layers < 0:
            raise InvalidRequestError(
                f"KV cache needs positive batch_size and max_length (got {batch_size}, {max_length})"
            )
        if max_length > config.max_position_embeddings:
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings}; ask for a shorter generation"
            )
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.config = config
        self.max_length = max_length
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

    def check_room(self, num_new_tokens: int) -> None:
        longest = int(self.lengths.max().item()) if self.batch_size else 0
        if longest + num_new_tokens > self.max_length:
            raise CapacityError(
                f"KV cache is full: a session at {longest} tokens cannot take {num_new_tokens} more "
                f"(max_length {self.max_length}); start a new session with a larger max_length"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, kv_heads, T, head_dim) of ``layer`` at each row's length.

        Returns the full key and value buffers (B, kv_heads, max_length, head_dim); positions at
        or past ``lengths + T`` hold stale data that the caller masks. Does not advance lengths.
        """
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise InvalidRequestError(f"batch of {B} rows does not match the KV cache's {self.batch_size} sessions")
        pos = self.lengths[:, None] + torch.arange(T, device=k.device)[None, :]  # (B, T)
        idx = pos[:, None, :, None].expand(B, k.shape[1], T, k.shape[3])
        self.keys[layer].scatter_(2, idx, k.to(self.keys[layer].dtype))
        self.values[layer].scatter_(2, idx, v.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]

    def advance(self, num_new_tokens: int) -> None:
        self.lengths += num_new_tokens

    def select(self, rows: list[int] | torch.Tensor) -> "KVCache":
        """A new cache holding copies of the given rows (sessions), in that order."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        out = KVCache.__new__(KVCache)
        out.config, out.max_length = self.config, self.max_length
        out.keys = [k.index_select(0, rows_t) for k in self.keys]
        out.values = [v.index_select(0, rows_t) for v in self.values]
        out.lengths = self.lengths.index_select(0, rows_t)
        return out

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        """Stack sessions of several caches (same stage, same max_length) into one batch."""
        if not caches:
            raise InvalidRequestError("cannot concatenate an empty list of KV caches")
        first = caches[0]
        if any(c.max_length != first.max_length or c.num_layers != first.num_layers for c in caches):
            raise InvalidRequestError("KV caches to batch together need the same max_length and layer count")
        out = KVCache.__new__(KVCache)
        out.config, out.max_length = first.config, first.max_length
        out.keys = [torch.cat([c.keys[i] for c in caches]) for i in range(first.num_layers)]
        out.values = [torch.cat([c.values[i] for c in caches]) for i in range(first.num_layers)]
        out.lengths = torch.cat([c.lengths for c in caches])
        return out
