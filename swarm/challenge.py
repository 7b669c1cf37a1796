"""The compute challenge: a seeded matmul whose result the coordinator can check cheaply.

Protocol (coordinator.proto ``StartChallenge`` / ``CommitChallenge`` / ``OpenChallenge``):

1. the coordinator sends ``(seed, n, count, target_s)`` and starts its clock;
2. the node computes ``C_k = A_k @ B_k`` (n x n, float32; A_k, B_k from :func:`matrix`) for
   k = 0, 1, ... until ``target_s`` passed or ``count`` products are done, hashes every row of every C_k (SHA-256 of its float32 bytes) and sends the
   SHA-256 of all row digests (the commitment); the coordinator stops its clock here:
   ``measured_tflops = count_done * 2 n^3 / elapsed`` (a lower bound of the node's speed, the only
   figure the node cannot inflate);
3. the coordinator picks ``num_open`` rows at random AFTER the commitment; the node sends all row
   digests and those rows; the coordinator checks that the digests hash to the commitment, that
   each row hashes to its digest, and recomputes each row (``A_k[r] @ B_k``: O(n^2) per row)
   within :data:`ROW_RTOL`. A node that skipped a fraction f of the rows is caught with
   probability ``1 - (1 - f) ** num_open``.

The matrices come from integer arithmetic (exact on every device), mapped to [-1, 1).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

_P1, _P2, _P3 = 2654435761, 40503, 2246822519
ROW_RTOL = 1e-3  # fp32 row of 1024 products: honest CPU differences are ~1e-6 relative (measured)
MIN_N, MAX_N = 128, 4096
MAX_COUNT = 64


def matrix(seed: int, which: int, n: int, *, device="cpu") -> torch.Tensor:
    """The (n, n) float32 matrix number ``which`` (A_k: 2k, B_k: 2k+1) of challenge ``seed``."""
    i = torch.arange(n, dtype=torch.int64, device=device).view(n, 1)
    j = torch.arange(n, dtype=torch.int64, device=device).view(1, n)
    base = (int(seed) * 1000003 + which * 7919) % (1 << 31)
    v = (i * _P1 + j * _P2 + base) % (1 << 31)
    v = (v * _P3) % (1 << 31)
    v = (v ^ (v >> 13)) % (1 << 20)
    return v.to(torch.float32) / float(1 << 19) - 1.0


def matrix_row(seed: int, which: int, n: int, row: int) -> np.ndarray:
    return matrix(seed, which, n)[row].numpy()


def row_digest(row: bytes) -> bytes:
    return hashlib.sha256(row).digest()


def commitment_of(digests: bytes) -> bytes:
    return hashlib.sha256(digests).digest()


class Solver:
    """The node's side: compute, commit, open."""

    def __init__(self, seed: int, n: int, count: int, *, target_s: float, device: str = "cpu") -> None:
        self.seed, self.n, self.count, self.target_s = seed, n, count, target_s
        self.device = torch.device(device)
        self.products: list[np.ndarray] = []
        self.digests = b""

    def compute(self) -> tuple[bytes, int]:
        """Compute products until ``target_s`` passed; returns (commitment, number of products)."""
        digests = []
        t0 = time.monotonic()
        for k in range(self.count):
            if k and time.monotonic() - t0 >= self.target_s:
                break
            a = matrix(self.seed, 2 * k, self.n, device=self.device)
            b = matrix(self.seed, 2 * k + 1, self.n, device=self.device)
            c = (a @ b).to("cpu").numpy().astype("<f4", copy=False)  # (n, n)
            self.products.append(c)
            digests.extend(row_digest(c[r].tobytes()) for r in range(self.n))
        self.digests = b"".join(digests)
        return commitment_of(self.digests), len(self.products)

    def open(self, rows: list[int]) -> tuple[bytes, bytes]:
        out = [self.products[i // self.n][i % self.n].tobytes() for i in rows]
        return self.digests, b"".join(out)


def check_answer(*, seed: int, n: int, count: int, commitment: bytes, rows: list[int], row_digests: bytes,
                 row_bytes: bytes) -> str:
    """The coordinator's check; returns "" when it passes, else why not."""
    if len(row_digests) != count * n * 32:
        return f"expected {count * n} row digests"
    if commitment_of(row_digests) != commitment:
        return "row digests do not match the commitment"
    if len(row_bytes) != len(rows) * n * 4:
        return f"expected {len(rows)} opened rows of {n} float32 values"
    b_cache: dict[int, np.ndarray] = {}
    for pos, idx in enumerate(rows):
        k, r = divmod(idx, n)
        got_bytes = row_bytes[pos * n * 4:(pos + 1) * n * 4]
        if row_digest(got_bytes) != row_digests[idx * 32:(idx + 1) * 32]:
            return f"row {idx} does not match its digest"
        got = np.frombuffer(got_bytes, dtype="<f4").astype(np.float64)
        if k not in b_cache:
            b_cache[k] = matrix(seed, 2 * k + 1, n).numpy().astype(np.float64)
        want = matrix_row(seed, 2 * k, n, r).astype(np.float64) @ b_cache[k]
        err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
        if not np.isfinite(err) or err > ROW_RTOL:
            return f"row {idx} is wrong (relative error {err:.2e})"
    return ""


def size_for(device_kind: str) -> int:
    """The matrix size: large enough that a GPU is compute-bound (not launch- or copy-bound),
    small enough that one product takes a CPU well under a second and the check stays cheap."""
    return 4096 if device_kind == "cuda" else 1024
