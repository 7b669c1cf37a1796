"""Open-loop travelling-salesman path: the pipeline order of the stage groups (DESIGN.md 3.2).

``open_path(cost)`` visits every node once, starting and ending anywhere, minimising the sum of
``cost[a][b]`` along the path (``cost`` may be asymmetric). Exact by Held-Karp dynamic
programming (vectorised over each subset size) up to ``EXACT_MAX`` nodes; beyond that, nearest
neighbour from every start followed by 2-opt / or-opt improvement (a heuristic).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

EXACT_MAX = 12  # 2^12 * 12^2 = 0.6 M operations per solve: a few ms in numpy


@lru_cache(maxsize=32)
def _tables(n: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Per subset size s >= 2: (masks, prev, valid) where prev[i, k] = masks[i] without node k."""
    masks = np.arange(1 << n, dtype=np.int64)
    pop = np.zeros(1 << n, dtype=np.int64)
    for b in range(n):
        pop += (masks >> b) & 1
    bits = 1 << np.arange(n, dtype=np.int64)
    out = []
    for size in range(2, n + 1):
        layer = masks[pop == size]
        valid = (layer[:, None] & bits[None, :]) != 0  # (m, n): node k is in the subset
        prev = np.where(valid, layer[:, None] ^ bits[None, :], 0)  # 0: the empty set, dp = inf
        out.append((layer, prev, valid))
    return tuple(out)


def _held_karp(cost: np.ndarray, want_order: bool = True) -> tuple[float, list[int]]:
    n = cost.shape[0]
    full = (1 << n) - 1
    dp = np.full((1 << n, n), np.inf)
    dp[1 << np.arange(n), np.arange(n)] = 0.0
    ct = cost.T[None, :, :]  # ct[0, k, j] = cost[j, k]
    parents = []
    for layer, prev, valid in _tables(n):
        # dp[M, k] = min_j dp[M - k, j] + cost[j, k]  for k in M (j ranges over M - k; others are inf)
        cand = dp[prev] + ct  # (m, n_k, n_j)
        if want_order:
            j_best = np.argmin(cand, axis=2)
            vals = np.take_along_axis(cand, j_best[:, :, None], axis=2)[:, :, 0]
            parents.append(j_best)
        else:
            vals = cand.min(axis=2)
        dp[layer] = vals
    last = int(np.argmin(dp[full]))
    total = float(dp[full, last])
    if not want_order:
        return total, []
    parent = np.full((1 << n, n), -1, dtype=np.int64)
    for (layer, _, _), pj in zip(_tables(n), parents):
        parent[layer] = pj
    order = [last]
    mask = full
    while len(order) < n:
        j = int(parent[mask, order[-1]])
        mask ^= 1 << order[-1]
        order.append(j)
    order.reverse()
    return total, order


def path_cost(cost: np.ndarray, order: list[int]) -> float:
    return float(sum(cost[a, b] for a, b in zip(order, order[1:])))


def _improve(cost: np.ndarray, order: list[int]) -> list[int]:
    """2-opt (segment reversal, valid for asymmetric costs via full re-evaluation) + or-opt."""
    n = len(order)
    best = path_cost(cost, order)
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                cand = order[:i] + order[i : j + 1][::-1] + order[j + 1 :]
                c = path_cost(cost, cand)
                if c < best - 1e-12:
                    order, best, improved = cand, c, True
        for seg in (1, 2, 3):
            for i in range(n - seg + 1):
                piece = order[i : i + seg]
                rest = order[:i] + order[i + seg :]
                for j in range(len(rest) + 1):
                    if j == i:
                        continue
                    cand = rest[:j] + piece + rest[j:]
                    c = path_cost(cost, cand)
                    if c < best - 1e-12:
                        order, best, improved = cand, c, True
                        break
                if improved:
                    break
            if improved:
                break
    return order


def _heuristic(cost: np.ndarray) -> tuple[float, list[int]]:
    n = cost.shape[0]
    best_order: list[int] = []
    best = np.inf
    for start in range(n):
        order = [start]
        left = set(range(n)) - {start}
        while left:
            cur = order[-1]
            nxt = min(left, key=lambda b: (cost[cur, b], b))  # tie-break: lowest index
            order.append(nxt)
            left.remove(nxt)
        c = path_cost(cost, order)
        if c < best:
            best, best_order = c, order
    best_order = _improve(cost, best_order)
    return path_cost(cost, best_order), best_order


def open_path_cost(cost: np.ndarray) -> float:
    """Only the cost of ``open_path`` (faster: no order reconstruction)."""
    n = cost.shape[0]
    if 2 < n <= EXACT_MAX:
        return _held_karp(np.asarray(cost, dtype=np.float64), want_order=False)[0]
    return open_path(cost)[0]


def open_path(cost: np.ndarray) -> tuple[float, list[int]]:
    """(min path cost, node order) over all Hamiltonian paths of the complete digraph ``cost``."""
    n = cost.shape[0]
    if n == 1:
        return 0.0, [0]
    if n == 2:
        return (float(cost[0, 1]), [0, 1]) if cost[0, 1] <= cost[1, 0] else (float(cost[1, 0]), [1, 0])
    if n <= EXACT_MAX:
        return _held_karp(np.asarray(cost, dtype=np.float64))
    return _heuristic(np.asarray(cost, dtype=np.float64))
