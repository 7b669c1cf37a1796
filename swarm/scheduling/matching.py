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
    packed = np.packbits(mask, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def max_matching(adj: list[int], n_right: int) -> tuple[int, list[int]]:
    """Maximum bipartite matching; ``adj[u]`` is the bitmask of right vertices u may take.

    Returns (size, match_of_right) where match_of_right[v] is the left vertex or -1.
    """
    match_r = [-1] * n_right
    match_l = [-1] * len(adj)
    size = 0
    # Greedy start: most rows find a free partner directly, leaving few augmentations.
    taken = 0
    for u, a in enumerate(adj):
        free = a & ~taken
        if free:
            low = free & -free
            v = low.bit_length() - 1
            taken |= low
            match_r[v] = u
            match_l[u] = v
            size += 1

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


@dataclass(frozen=True, slots=True)
class Bottleneck:
    """Result of a bottleneck matching: value, perm (row i -> column perm[i]), deficiency."""

    value: float
    perm: tuple[int, ...]
    deficiency: int
    below: float  # largest entry strictly below ``value`` (== value when there is none)


def bottleneck_matching(w: np.ndarray, *, want_perm: bool = True, want_deficiency: bool = False) -> Bottleneck:
    """Min over perfect matchings M of max_{(i,j) in M} w[i, j], for a square matrix ``w``."""
    n = w.shape[0]
    if n == 1:
        v = float(w[0, 0])
        return Bottleneck(v, (0,), 1, v)
    lo = max(float(w.min(axis=1).max()), float(w.min(axis=0).max()))
    vals = np.unique(w)
    k = int(np.searchsorted(vals, lo))
    hi = len(vals) - 1
    best_match: list[int] | None = None
    size, match = max_matching(_bitmask_rows(w <= vals[k]), n)
    if size == n:
        hi = k
        best_match = match
    else:
        k += 1
        while k < hi:  # invariant: vals[hi] is feasible, vals[k-1] is not
            mid = (k + hi) // 2
            size, match = max_matching(_bitmask_rows(w <= vals[mid]), n)
            if size == n:
                hi = mid
                best_match = match
            else:
                k = mid + 1
    value = float(vals[hi])
    perm: tuple[int, ...] = ()
    if want_perm:
        if best_match is None:
            _, best_match = max_matching(_bitmask_rows(w <= vals[hi]), n)
        inv = [0] * n
        for col, row in enumerate(best_match):
            inv[row] = col
        perm = tuple(inv)
    deficiency = 1
    below = value
    if want_deficiency and hi > 0:
        below = float(vals[hi - 1])
        size, _ = max_matching(_bitmask_rows(w < value), n)
        deficiency = n - size
    return Bottleneck(value, perm, deficiency, below)


def bottleneck_value(w: np.ndarray) -> float:
    return bottleneck_matching(w, want_perm=False).value
