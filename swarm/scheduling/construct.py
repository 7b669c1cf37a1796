"""Starting partitions for the search, built from the link matrices (never from device order).

Devices are clustered by link speed: for each of a few thresholds t on the pipeline cost W,
clusters are the connected components of the graph of links with W <= t (regions, racks,
multi-GPU hosts). Each clustering gives two partitions:

- *pipeline packing*: the D pipelines are rows of P slots; clusters (largest first) are laid
  into the emptiest row, contiguously, so consecutive stages of a pipeline sit on fast links;
  the stage groups are the columns. With 8 hosts of 8 GPUs this is "one pipeline per host";
  with 8 hosts of 4 GPUs + 32 single GPUs it is "4 stages inside a host, then 4 single GPUs".
- *group packing*: the P groups are rows of D slots filled the same way, so each stage's
  data-parallel all-reduce stays inside a region.

Plus a speed-sorted partition (stage groups of similar TFLOPS) and random balanced ones.
"""

from __future__ import annotations

import numpy as np

from swarm.scheduling.problem import Problem

MAX_LEVELS = 12


def _components(adj: np.ndarray) -> list[list[int]]:
    n = adj.shape[0]
    seen = np.zeros(n, dtype=bool)
    comps = []
    for s in range(n):
        if seen[s]:
            continue
        frontier = np.zeros(n, dtype=bool)
        frontier[s] = True
        comp = frontier.copy()
        while frontier.any():
            nxt = adj[frontier].any(axis=0) & ~comp
            comp |= nxt
            frontier = nxt
        seen |= comp
        comps.append(np.nonzero(comp)[0].tolist())
    return comps


def clusterings(prob: Problem) -> list[list[list[int]]]:
    """Distinct clusterings of the devices at increasing link-cost thresholds."""
    n = prob.n
    sym = np.maximum(prob.w, prob.w.T)
    off = sym[~np.eye(n, dtype=bool)]
    levels = np.unique(off)
    if len(levels) > MAX_LEVELS:
        # Measured links are noisy: cut where the sorted costs jump the most (relative gap),
        # which separates host / rack / region levels however many links each level has.
        gaps = levels[1:] / np.maximum(levels[:-1], 1e-300)
        cut = np.sort(np.argsort(-gaps, kind="stable")[:MAX_LEVELS])
        levels = levels[cut]
    out: list[list[list[int]]] = []
    seen: set[tuple] = set()
    for t in levels:
        comps = _components(sym <= t)
        if len(comps) == 1 or len(comps) == n:
            continue
        key = tuple(sorted(tuple(c) for c in comps))
        if key not in seen:
            seen.add(key)
            out.append(comps)
    return out


def _order_clusters(prob: Problem, comps: list[list[int]]) -> list[list[int]]:
    # Largest clusters first; within a cluster fastest devices first. Ties by the cluster's
    # internal mean link cost, then by first member (only among look-alike clusters).
    def inner(c: list[int]) -> float:
        return float(prob.w[np.ix_(c, c)].mean()) if len(c) > 1 else 0.0

    ordered = sorted(comps, key=lambda c: (-len(c), inner(c), c[0]))
    return [sorted(c, key=lambda d: (prob.sec_per_layer[d], d)) for c in ordered]


def pack(comps: list[list[int]], rows: int, cap: int) -> list[list[int]]:
    """Lay clusters (in order) into the emptiest row, contiguously, splitting only if needed."""
    filled: list[list[int]] = [[] for _ in range(rows)]
    for comp in comps:
        rest = list(comp)
        while rest:
            r = min(range(rows), key=lambda i: (len(filled[i]), i))
            take = cap - len(filled[r])
            filled[r].extend(rest[:take])
            rest = rest[take:]
    return filled


def pipeline_packing(prob: Problem, comps: list[list[int]]) -> list[list[int]]:
    rows = pack(_order_clusters(prob, comps), prob.d, prob.p)
    return [[rows[i][j] for i in range(prob.d)] for j in range(prob.p)]


def group_packing(prob: Problem, comps: list[list[int]]) -> list[list[int]]:
    return pack(_order_clusters(prob, comps), prob.p, prob.d)


def speed_sorted(prob: Problem) -> list[list[int]]:
    order = sorted(range(prob.n), key=lambda d: (prob.sec_per_layer[d], d))
    return [order[g * prob.d : (g + 1) * prob.d] for g in range(prob.p)]


def random_partition(prob: Problem, rng: np.random.Generator) -> list[list[int]]:
    perm = rng.permutation(prob.n).tolist()
    return [perm[g * prob.d : (g + 1) * prob.d] for g in range(prob.p)]


def constructions(prob: Problem) -> list[list[list[int]]]:
    """Deterministic starting partitions (no randomness)."""
    out = []
    for comps in clusterings(prob):
        out.append(pipeline_packing(prob, comps))
        out.append(group_packing(prob, comps))
    singletons = [[d] for d in range(prob.n)]
    out.append(pipeline_packing(prob, singletons))
    out.append(speed_sorted(prob))
    return out
