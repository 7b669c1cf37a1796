"""Per-sample rows kept at a pipeline boundary: AQ-SGD's m(x), or error-feedback residuals.

A store holds ``num_samples`` rows of ``row_shape`` float16 values plus a "seen" flag per row,
in RAM (a torch tensor, on any device) or in a disk memmap. It is bound to a ``key`` (job and
dataset identity, see :func:`dataset_key`): a memmap store on disk that was made for another key
refuses to open, and messages carry the key's fingerprint so a peer with stale state is rejected.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from swarm.errors import InvalidRequestError

log = logging.getLogger(__name__)


class StaleStateError(InvalidRequestError):
    """Boundary state or a message belongs to another job or dataset. Reset the state."""


def key_fingerprint(key: str) -> int:
    """A 64-bit fingerprint of a state key (carried by every message)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def dataset_key(job_id: str, token_blocks: Iterable[object], *, extra: str = "") -> str:
    """A key naming a job and the exact content of its dataset (e.g. an int64 array of blocks).

    Re-tokenising the data or changing the block length changes the key, so old rows are never
    reused for different samples.
    """
    h = hashlib.sha256()
    for block in token_blocks:
        if isinstance(block, torch.Tensor):
            block = block.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(block))
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return f"{job_id}:{extra}:{h.hexdigest()[:32]}"


class RowStore:
    """Rows of float16 per sample id (0 <= id < num_samples) with seen flags. Base class."""

    def __init__(self, *, key: str, num_samples: int, row_shape: tuple[int, ...]) -> None:
        if not key:
            raise InvalidRequestError("a boundary state needs a non-empty key (job and dataset identity)")
        if num_samples <= 0 or any(int(d) <= 0 for d in row_shape):
            raise InvalidRequestError(f"bad state size: {num_samples} samples of rows {row_shape}")
        self.key = key
        self.fingerprint = key_fingerprint(key)
        self.num_samples = int(num_samples)
        self.row_shape = tuple(int(d) for d in row_shape)

    @property
    def row_numel(self) -> int:
        return math.prod(self.row_shape)

    @property
    def nbytes(self) -> int:
        return self.num_samples * (self.row_numel * 2 + 1)

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 CPU ids, validated: in range and unique. Raises InvalidRequestError."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise InvalidRequestError(
                f"sample ids must be in 0..{self.num_samples - 1}; got {int(ids.min())}..{int(ids.max())}"
            )
        if ids.unique().numel() != ids.numel():
            raise InvalidRequestError("sample ids in one message must be distinct")
        return ids

    # subclasses implement these
    def seen(self, ids: torch.Tensor) -> torch.Tensor:  # (B,) bool on CPU
        raise NotImplementedError

    def read(self, ids: torch.Tensor, device: torch.device | str) -> torch.Tensor:  # (B, *row) f16
        raise NotImplementedError

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:  # also marks seen
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass


class RamStore(RowStore):
    """Rows in a torch tensor on ``device`` (CPU RAM or GPU memory), allocated up front."""

    def __init__(self, *, key: str, num_samples: int, row_shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        super().__init__(key=key, num_samples=num_samples, row_shape=row_shape)
        self.device = torch.device(device)
        self.rows = torch.zeros((self.num_samples, *self.row_shape), dtype=torch.float16, device=self.device)
        self._seen = torch.zeros(self.num_samples, dtype=torch.bool)

    def seen(self, ids):
        return self._seen[ids]

    def read(self, ids, device):
        return self.rows[ids.to(self.device)].to(device)

    def write(self, ids, rows):
        self.rows[ids.to(self.device)] = rows.to(device=self.device, dtype=torch.float16)
        self._seen[ids] = True

    def reset(self):
        self.rows.zero_()
        self._seen.zero_()


class MemmapStore(RowStore):
    """Rows in ``<dir>/rows.f16`` (numpy memmap), flags in ``seen.u8``, identity in ``meta.json``.

    Opening a directory made for another key or shape raises :class:`StaleStateError` unless
    ``reset=True``, which wipes it.
    """

    def __init__(
        self, path: str | Path, *, key: str, num_samples: int, row_shape: tuple[int, ...], reset: bool = False
    ) -> None:
        super().__init__(key=key, num_samples=num_samples, row_shape=row_shape)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        meta = {"key": key, "num_samples": self.num_samples, "row_shape": list(self.row_shape), "dtype": "float16"}
        fresh = reset or not meta_file.is_file()
        if not fresh:
            try:
                old = json.loads(meta_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise StaleStateError(f"boundary state {self.path} is unreadable ({exc}); delete it or reset") from exc
            if old != meta:
                raise StaleStateError(
                    f"boundary state in {self.path} belongs to key {old.get('key')!r} with "
                    f"{old.get('num_samples')} rows of {old.get('row_shape')}, not {key!r}; delete it or open with reset=True"
                )
        mode = "w+" if fresh else "r+"
        self._rows = np.memmap(self.path / "rows.f16", dtype=np.float16, mode=mode, shape=(self.num_samples, self.row_numel))
        self._seen = np.memmap(self.path / "seen.u8", dtype=np.uint8, mode=mode, shape=(self.num_samples,))
        if fresh:
            self._seen[:] = 0
            self._seen.flush()
            meta_file.write_text(json.dumps(meta))

    def seen(self, ids):
        return torch.from_numpy(np.asarray(self._seen[ids.numpy()]) != 0)

    def read(self, ids, device):
        rows = torch.from_numpy(np.asarray(self._rows[ids.numpy()]))
        return rows.view(len(ids), *self.row_shape).to(device)

    def write(self, ids, rows):
        idx = ids.numpy()
        self._rows[idx] = rows.detach().to(device="cpu", dtype=torch.float16).reshape(len(ids), -1).numpy()
        self._seen[idx] = 1

    def reset(self):
        self._rows[:] = 0
        self._seen[:] = 0
        self.flush()

    def flush(self):
        self._rows.flush()
        self._seen.flush()


def make_store(
    *, key: str, num_samples: int, row_shape: tuple[int, ...], storage: str | Path = "ram",
    device: torch.device | str = "cpu", reset: bool = False,
) -> RowStore:
    """``storage="ram"`` for :class:`RamStore` on ``device``, else a directory for :class:`MemmapStore`."""
    if str(storage) == "ram":
        return RamStore(key=key, num_samples=num_samples, row_shape=row_shape, device=device)
    return MemmapStore(storage, key=key, num_samples=num_samples, row_shape=row_shape, reset=reset)
