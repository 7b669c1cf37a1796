"""Bottleneck perfect matching between two equally sized device groups (DESIGN.md 3.2).

``bottleneck_matching(w)`` returns the smallest t such that the bipartite graph of entries
``w[i][j] <= t`` has a perfect matching, found by binary search over the distinct entries
(starting at a lower bound that is usually already feasible) with Kuhn's augmenting paths on
bitmask rows. It also returns a matching reaching t and the *deficiency*: how many pairs still
need a link of weight t (size minus the maximum matching on links strictly below t), which the
search uses to tell "almost better" from "far from better" on the plateaus of a max objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _bitmask_rows(mask: np.ndarray) -> list[int]:
    """Row i of a boolean matrix as an int with bit j set where mask[i, j]."""
    n_cols = mask.shape[1]
    packed = np.packbits(mask, axis=1, bitorder="little")
    if n_cols <= 8:
        return packed[:, 0].tolist()
    if n_cols <= 64:
        wide = np.zeros((mask.shape[0], 8), dtype=np.uint8)
        wide[:, : packed.shape[1]] = packed
        return wide.view("<u8")[:, 0].tolist()
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def max_matching(adj: list[int], n_right: int, match_r: list[int] | None = None) -> tuple[int, list[int]]:
    """Maximum bipartite matching; ``adj[u]`` is the bitmask of right vertices u may take.

    ``match_r`` (modified in place): a valid matching to start from, e.g. the maximum matching
    of a subgraph. Returns (size, match_of_right) where match_of_right[v] is the left vertex or -1.
    """
    match_l = [-1] * len(adj)
    if match_r is None:
        match_r = [-1] * n_right
        taken = 0
        # Greedy start: most rows find a free partner directly, leaving few augmentations.
        for u, a in enumerate(adj):
            free = a & ~taken
            if free:
                low = free & -free
                v = low.bit_length() - 1
                taken |= low
                match_r[v] = u
                match_l[u] = v
    else:
        for v, u in enumerate(match_r):
            if u >= 0:
                match_l[u] = v
    size = sum(1 for u in match_l if u >= 0)

    def augment(u: int, seen: list[int]) -> bool:
        cand = adj[u] & ~seen[0]
        while cand:
            low = cand & -cand
            v = low.bit_length() - 1
            seen[0] |= low
            if match_r[v] < 0 or augment(match_r[v], seen):
                match_r[v] = u
                match_l[u] = v
                return True
            cand &= ~seen[0]
        return False

    for u in range(len(adj)):
        if match_l[u] < 0 and adj[u]:
            if augment(u, [0]):
                size += 1
    return size, match_r


_LINEAR_STEPS = 6  # levels scanned one by one before switching to binary search


@dataclass(frozen=True, slots=True)
class Bottleneck:
    """Result of a bottleneck matching: value, perm (row i -> column perm[i]), deficiency."""

    value: float
    perm: tuple[int, ...]
    deficiency: int
    below: float  # largest entry strictly below ``value`` (== value when there is none)


def bottleneck_matching(w: np.ndarray, *, want_perm: bool = True, want_deficiency: bool = False) -> Bottleneck:
    """Min over perfect matchings M of max_{(i,j) in M} w[i, j], for a square matrix ``w``.

    Scans the distinct entries upwards from the lower bound max(max row-min, max col-min),
    growing one maximum matching as links are added (the answer is usually at or just above
    the bound), so each level costs only the augmentations it needs.
    """
    n = w.shape[0]
    if n == 1:
        v = float(w[0, 0])
        return Bottleneck(v, (0,), 1, v)
    lo = max(float(w.min(axis=1).max()), float(w.min(axis=0).max()))
    vals = np.unique(w)
    k = int(np.searchsorted(vals, lo))
    match: list[int] | None = None
    size_below = -1
    steps = 0
    while True:
        size, match = max_matching(_bitmask_rows(w <= vals[k]), n, match)
        if size == n:
            break
        size_below = size
        k += 1
        steps += 1
        if steps == _LINEAR_STEPS:  # far above the bound: binary search the rest
            lo_k, hi_k = k, len(vals) - 1  # vals[lo_k - 1] infeasible, vals[hi_k] feasible
            while lo_k < hi_k:
                mid = (lo_k + hi_k) // 2
                size, _ = max_matching(_bitmask_rows(w <= vals[mid]), n, list(match))
                if size == n:
                    hi_k = mid
                else:
                    lo_k = mid + 1
            k = hi_k
            size_below = -1 if k > 0 else size_below
            if k > 0:
                size_below, match = max_matching(_bitmask_rows(w <= vals[k - 1]), n, match)
    value = float(vals[k])
    below = float(vals[k - 1]) if k > 0 else value
    deficiency = 1
    if want_deficiency and k > 0:
        if size_below < 0:
            size_below, _ = max_matching(_bitmask_rows(w < value), n)
        deficiency = n - size_below
    perm: tuple[int, ...] = ()
    if want_perm:
        inv = [0] * n
        for col, row in enumerate(match):
            inv[row] = col
        perm = tuple(inv)
    return Bottleneck(value, perm, deficiency, below)


def bottleneck_value(w: np.ndarray) -> float:
    return bottleneck_matching(w, want_perm=False).value
