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


def _two_opt(cost: np.ndarray, order: np.ndarray, max_rounds: int) -> np.ndarray:
    """Best-improvement segment reversal, all (i, j) scored at once with prefix sums.

    Reversing positions i..j turns the inner edges around (forward costs become backward
    ones, fine for asymmetric costs) and replaces the two edges at the segment's ends.
    """
    n = len(order)
    idx = np.arange(n)
    i_ = idx[:, None]
    j_ = idx[None, :]
    valid = j_ > i_
    for _ in range(max_rounds):
        fwd = cost[order[:-1], order[1:]]
        bwd = cost[order[1:], order[:-1]]
        F = np.concatenate(([0.0], np.cumsum(fwd)))
        R = np.concatenate(([0.0], np.cumsum(bwd)))
        delta = (R[None, :] - R[:, None]) - (F[None, :] - F[:, None])  # inner edges i..j-1
        prev = np.roll(order, 1)  # order[i-1]
        nxt = np.roll(order, -1)  # order[j+1]
        left = np.where(i_ > 0, cost[prev[:, None], order[None, :]] - cost[prev, order][:, None], 0.0)
        right = np.where(j_ < n - 1, cost[order[:, None], nxt[None, :]] - cost[order, nxt][None, :], 0.0)
        delta = np.where(valid, delta + left + right, np.inf)
        k = int(np.argmin(delta))
        i, j = divmod(k, n)
        if not delta[i, j] < -1e-12:
            break
        order = np.concatenate((order[:i], order[i : j + 1][::-1], order[j + 1 :]))
    return order


def _or_opt(cost: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, bool]:
    """Move one node to its best other place (first improving node, best place)."""
    n = len(order)
    base = path_cost(cost, order.tolist())
    for k in range(n):
        node = order[k]
        rest = np.delete(order, k)
        removed = base
        if k > 0:
            removed -= cost[order[k - 1], node]
        if k < n - 1:
            removed -= cost[node, order[k + 1]]
        if 0 < k < n - 1:
            removed += cost[order[k - 1], order[k + 1]]
        # insert before rest[m] (m = 0..n-1; m = n-1 appends)
        m = np.arange(n)
        before = np.where(m > 0, cost[rest[np.maximum(m - 1, 0)], node], 0.0)
        after = np.where(m < n - 1, cost[node, rest[np.minimum(m, n - 2)]], 0.0)
        gap = np.where((m > 0) & (m < n - 1), cost[rest[np.maximum(m - 1, 0)], rest[np.minimum(m, n - 2)]], 0.0)
        total = removed + before + after - gap
        total[k] = np.inf  # the same place
        best = int(np.argmin(total))
        if total[best] < base - 1e-12:
            return np.insert(rest, best, node), True
    return order, False


def _heuristic(cost: np.ndarray) -> tuple[float, list[int]]:
    """Nearest neighbour from every start, then 2-opt and or-opt on the best three."""
    n = cost.shape[0]
    starts = []
    big = cost + np.diag(np.full(n, np.inf))
    for s0 in range(n):
        seen = np.zeros(n, dtype=bool)
        seen[s0] = True
        order = [s0]
        for _ in range(n - 1):
            row = np.where(seen, np.inf, big[order[-1]])
            nxt = int(np.argmin(row))  # ties: lowest index
            seen[nxt] = True
            order.append(nxt)
        starts.append((path_cost(cost, order), order))
    starts.sort(key=lambda t: t[0])
    best_c, best_o = np.inf, []
    for _, order in starts[:3]:
        o = np.asarray(order)
        for _ in range(4 * n):
            o = _two_opt(cost, o, 4 * n)
            o, moved = _or_opt(cost, o)
            if not moved:
                break
        c = path_cost(cost, o.tolist())
        if c < best_c:
            best_c, best_o = c, o.tolist()
    return best_c, best_o


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
