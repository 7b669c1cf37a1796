"""The DT-FM communication cost model (DESIGN.md 3.2), exactly as the scenario files state it.

- ``A[d][d'] = 2 * (delay[d][d'] + c_dp / (D_DP * bw[d][d']))``; a group's data-parallel cost
  is ``max_{d in C} sum_{d' in C, d' != d} A[d][d']``; DP is the max over groups.
- ``W[d][d'] = delay[d][d'] + c_pp / bw[d][d']``; two adjacent groups cost their bottleneck
  perfect matching under W; PP is the open-loop TSP path over those pair costs.
- total = DP + 2 * PP. A *fixed assignment* (a grid: pipeline i, stage j -> device) costs
  ``DP(columns) + 2 * sum_j max_i W[grid[i][j]][grid[i][j+1]]``.

Forward activations and backward gradients may differ in size (a codec compressing them at
different bits): :func:`pipeline_matrix` then makes W the mean of the two directions' matrices,
``W = (W_fw + W_bw) / 2``, so the pipeline term ``2 * PP`` is the forward-activation time plus
the backward-gradient time over each boundary's slowest pair. With equal bytes it is exactly
DT-FM's ``2 * PP`` (``(x + x) / 2 == x`` in floating point), so the search keeps one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from swarm.scheduling.matching import bottleneck_matching
from swarm.scheduling.tsp import open_path


def dp_matrix(delay_s: np.ndarray, bandwidth_Bps: np.ndarray, c_dp_bytes: float, d_dp: int) -> np.ndarray:
    """A: per-peer all-reduce cost (s); zero on the diagonal."""
    with np.errstate(divide="ignore"):
        a = 2.0 * (delay_s + c_dp_bytes / (d_dp * bandwidth_Bps))
    np.fill_diagonal(a, 0.0)
    return a


def pp_matrix(delay_s: np.ndarray, bandwidth_Bps: np.ndarray, c_pp_bytes: float) -> np.ndarray:
    """W: time (s) to send one pipeline's activations over each link; zero on the diagonal."""
    with np.errstate(divide="ignore"):
        w = delay_s + c_pp_bytes / bandwidth_Bps
    np.fill_diagonal(w, 0.0)
    return w


def pipeline_matrix(delay_s: np.ndarray, bandwidth_Bps: np.ndarray, c_forward_bytes: float,
                    c_backward_bytes: float) -> np.ndarray:
    """W: the mean of the forward (activations) and backward (gradients) time over each link, so
    ``2 * W`` is one boundary crossing each way; equals :func:`pp_matrix` when the bytes are equal."""
    if c_forward_bytes == c_backward_bytes:
        return pp_matrix(delay_s, bandwidth_Bps, c_forward_bytes)
    return 0.5 * (pp_matrix(delay_s, bandwidth_Bps, c_forward_bytes) + pp_matrix(delay_s, bandwidth_Bps, c_backward_bytes))


def group_dp_cost(a: np.ndarray, group: list[int] | np.ndarray) -> float:
    g = np.asarray(group, dtype=int)
    if len(g) < 2:
        return 0.0
    return float(a[np.ix_(g, g)].sum(axis=1).max())


@dataclass(frozen=True, slots=True)
class PartitionCost:
    """Cost of a partition into groups, with the optimal order and matchings that reach it.

    ``order``: group indices in pipeline order; ``perms[k]``: for the boundary between
    ``order[k]`` and ``order[k+1]``, row i of the first group -> member perms[k][i] of the next.
    """

    total: float
    dp: float
    pp: float
    group_dp: tuple[float, ...]
    order: tuple[int, ...]
    boundary: tuple[float, ...]
    perms: tuple[tuple[int, ...], ...]


def pair_costs(w: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """B[a][b]: bottleneck matching cost from group a to group b."""
    p = len(groups)
    b = np.zeros((p, p))
    symmetric = bool(np.array_equal(w, w.T))
    for x in range(p):
        for y in range(p):
            if x == y or (symmetric and y < x):
                continue
            b[x, y] = bottleneck_matching(w[np.ix_(groups[x], groups[y])], want_perm=False).value
            if symmetric:
                b[y, x] = b[x, y]
    return b


def partition_cost(a: np.ndarray, w: np.ndarray, groups: list[list[int]]) -> PartitionCost:
    """DP + 2 * PP of a partition, with the best pipeline order and matchings."""
    gdp = tuple(group_dp_cost(a, g) for g in groups)
    b = pair_costs(w, groups)
    pp, order = open_path(b)
    perms = []
    for x, y in zip(order, order[1:]):
        perms.append(bottleneck_matching(w[np.ix_(groups[x], groups[y])]).perm)
    dp = max(gdp)
    return PartitionCost(
        total=dp + 2.0 * pp,
        dp=dp,
        pp=pp,
        group_dp=gdp,
        order=tuple(order),
        boundary=tuple(float(b[x, y]) for x, y in zip(order, order[1:])),
        perms=tuple(perms),
    )


def grid_from_partition(groups: list[list[int]], cost: PartitionCost) -> list[list[int]]:
    """Stage columns in pipeline order, rows aligned so row i is pipeline i."""
    first = list(groups[cost.order[0]])
    columns = [first]
    for k, perm in enumerate(cost.perms):
        nxt = groups[cost.order[k + 1]]
        prev = columns[-1]
        # prev[i] was row i of group order[k] as listed in `groups`; follow the matching
        src = groups[cost.order[k]]
        pos = {d: i for i, d in enumerate(src)}
        columns.append([nxt[perm[pos[d]]] for d in prev])
    return columns


def fixed_assignment_cost(a: np.ndarray, w: np.ndarray, columns: list[list[int]]) -> tuple[float, float, float]:
    """(total, dp, pp) of a fixed assignment: ``columns[j][i]`` runs stage j of pipeline i."""
    dp = max(group_dp_cost(a, c) for c in columns)
    pp = 0.0
    for c0, c1 in zip(columns, columns[1:]):
        pp += float(max(w[x, y] for x, y in zip(c0, c1)))
    return dp + 2.0 * pp, dp, pp
