"""A partition problem: the matrices and per-device constants the search needs, and scoring.

A *partition* is ``P`` groups of ``D`` device indices (group = one stage's data-parallel
group). ``Problem.evaluate`` scores one exactly; ``search`` changes partitions incrementally and
uses the same pieces. Two scores are kept:

- ``true``: the objective (DT-FM DP + 2 * PP, plus compute in the heterogeneous mode);
- ``surrogate``: ``true`` plus small terms that see progress on plateaus of the max/bottleneck
  objective: for each pipeline boundary, the fraction of pipelines that still need its slowest
  link (the deficiency of the bottleneck matching), and the mean of the groups' DP costs.
"""

from __future__ import annotations

import numpy as np

from swarm.scheduling.cluster import Cluster, JobShape
from swarm.scheduling.costs import pipeline_matrix
from swarm.scheduling.hetero import StageModel, allocate_layers, device_arrays, equal_layers
from swarm.scheduling.matching import bottleneck_matching
from swarm.scheduling.tsp import open_path_cost

LAMBDA_DP = 0.02  # weight of the mean group DP cost in the surrogate
SOFT_PP = 0.5  # weight of the deficiency term per boundary in the surrogate
_CACHE_MAX = 200_000  # pair-cost cache entries before it is cleared (< 100 MB)
UNPLACED_PENALTY_S = 1e7
NEAR_REL_TOL = 0.02  # links within 2% count as the same for move selection
NEAR_CLASSES_MAX_DEVICES = 512  # per layer that fits nowhere: any feasible partition beats it


def equivalence_classes(cluster: Cluster, tflops: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Class id per device; swapping two devices of one class leaves every cost unchanged."""
    n = cluster.num_devices
    delay, bw = cluster.delay_s, cluster.bandwidth_Bps
    keys: dict[tuple, list[int]] = {}
    for i in range(n):
        rd = np.delete(delay[i], i)
        rb = np.delete(bw[i], i)
        cd = np.delete(delay[:, i], i)
        cb = np.delete(bw[:, i], i)
        key = (float(tflops[i]), float(memory[i]), np.sort(rd).tobytes(), np.sort(rb).tobytes(), np.sort(cd).tobytes(), np.sort(cb).tobytes())
        keys.setdefault(key, []).append(i)
    cls = np.full(n, -1, dtype=np.int64)
    nxt = 0
    for members in keys.values():
        reps: list[int] = []
        for i in members:
            for r in reps:
                mask = np.ones(n, dtype=bool)
                mask[[i, r]] = False
                if (
                    np.array_equal(delay[i, mask], delay[r, mask])
                    and np.array_equal(delay[mask, i], delay[mask, r])
                    and np.array_equal(bw[i, mask], bw[r, mask])
                    and np.array_equal(bw[mask, i], bw[mask, r])
                    and delay[i, r] == delay[r, i]
                    and bw[i, r] == bw[r, i]
                ):
                    cls[i] = cls[r]
                    break
            else:
                reps.append(i)
                cls[i] = nxt
                nxt += 1
    return cls


def near_classes(cluster: Cluster, tflops: np.ndarray, memory: np.ndarray, exact: np.ndarray, rel_tol: float) -> np.ndarray:
    """Classes of devices whose links differ by at most ``rel_tol`` (measurement noise).

    Only used to skip swaps between look-alike devices in local search (a swap between them
    changes the cost by no more than the noise); costs are always computed exactly.
    """
    n = cluster.num_devices
    delay, bw = cluster.delay_s, cluster.bandwidth_Bps
    cls = exact.copy()
    reps: list[int] = []
    rep_of: dict[int, int] = {}

    def close(x: np.ndarray, y: np.ndarray) -> bool:
        return bool(np.all(np.abs(x - y) <= rel_tol * np.maximum(np.abs(x), np.abs(y))))

    for i in range(n):
        if int(exact[i]) in rep_of:  # exactly equal to an earlier device: same class
            cls[i] = cls[rep_of[int(exact[i])]]
            continue
        for r in reps:
            if tflops[i] != tflops[r] or memory[i] != memory[r]:
                continue
            mask = np.ones(n, dtype=bool)
            mask[[i, r]] = False
            if (
                close(delay[i, mask], delay[r, mask])
                and close(delay[mask, i], delay[mask, r])
                and close(bw[i, mask], bw[r, mask])
                and close(bw[mask, i], bw[mask, r])
            ):
                cls[i] = cls[r]
                break
        else:
            reps.append(i)
        rep_of[int(exact[i])] = i
    return cls


class Problem:
    """Everything the search needs for one (cluster, job, D_DP, D_PP, objective)."""

    def __init__(self, cluster: Cluster, job: JobShape, d_dp: int, d_pp: int, *, hetero: bool, balance_layers: bool = True) -> None:
        n = cluster.num_devices
        assert d_dp * d_pp == n
        self.cluster = cluster
        self.job = job
        self.n, self.d, self.p = n, d_dp, d_pp
        self.hetero = hetero
        self.balance_layers = balance_layers
        self.model = StageModel.build(job, d_dp, d_pp)
        delay, bw = cluster.delay_s, cluster.bandwidth_Bps
        with np.errstate(divide="ignore"):
            self.a0 = 2.0 * delay
            self.a1 = 2.0 / (d_dp * bw)
        np.fill_diagonal(self.a0, 0.0)
        np.fill_diagonal(self.a1, 0.0)
        self.c_pp = self.model.c_pp_bytes
        self.c_pp_backward = self.model.c_pp_backward_bytes
        # the mean of both directions' link times: 2 * PP = forward activations + backward gradients
        self.w = pipeline_matrix(delay, bw, self.c_pp, self.c_pp_backward)
        self.symmetric = bool(np.array_equal(self.w, self.w.T))
        self.tflops, self.memory = device_arrays(cluster)
        self.sec_per_layer = self.model.seconds_per_layer(self.tflops)
        self.equal_layers = equal_layers(job.num_layers, d_pp)
        # DT-FM mode: one c_dp for every group (the largest stage's, exact for even splits)
        if job.c_dp_bytes is not None and job.num_layers % d_pp == 0:
            self.c_dp_const = job.c_dp_bytes
        else:
            self.c_dp_const = self.model.grad_bytes_per_layer * int(self.equal_layers.max())
        self.classes = equivalence_classes(cluster, self.tflops, self.memory).astype(np.int32)
        # swaps between these look-alikes are skipped (exact classes when the cluster is big)
        if n <= NEAR_CLASSES_MAX_DEVICES:
            self.move_classes = near_classes(cluster, self.tflops, self.memory, self.classes, NEAR_REL_TOL)
        else:
            self.move_classes = self.classes
        # Pair costs are cached by class multisets. During the search look-alike devices (links
        # within NEAR_REL_TOL) share a class, so noisy measured matrices still hit the cache;
        # the final descent and the plan's reported costs are exact.
        self._key_classes = self.move_classes
        self._pair_cache: dict[bytes, tuple[float, float]] = {}
        self._path_cache: dict[bytes, float] = {}

    # ---- pieces ------------------------------------------------------------------------------
    def key(self, group: np.ndarray) -> bytes:
        """A group's multiset of classes (equal keys: interchangeable groups, up to the noise
        tolerance of ``move_classes`` unless ``exact_costs()`` was called)."""
        return np.sort(self._key_classes[group]).tobytes()

    def exact_costs(self) -> None:
        """From now on cache pair costs by exact equivalence classes only (states made before
        must be rebuilt: their keys and cached costs may be those of look-alike groups)."""
        if self._key_classes is not self.classes:
            self._key_classes = self.classes
            self._pair_cache.clear()
            self._path_cache.clear()

    def pair(self, ga: np.ndarray, gb: np.ndarray, ka: bytes | None = None, kb: bytes | None = None) -> tuple[float, float]:
        """(bottleneck, soft) cost from group ga to group gb.

        Cached by the two groups' multisets of equivalence classes: any class-preserving
        relabelling is an automorphism of the matrices, so equal keys mean equal costs.
        """
        key = (ka if ka is not None else self.key(ga)) + b"|" + (kb if kb is not None else self.key(gb))
        hit = self._pair_cache.get(key)
        if hit is not None:
            return hit
        r = bottleneck_matching(self.w[np.ix_(ga, gb)], want_perm=False, want_deficiency=True)
        out = (r.value, r.value + SOFT_PP * (r.value - r.below) * r.deficiency / len(ga))
        if len(self._pair_cache) > _CACHE_MAX:
            self._pair_cache.clear()
        self._pair_cache[key] = out
        return out

    def path_cost(self, cost: np.ndarray) -> float:
        """Open-loop TSP cost over a pair-cost matrix, cached by its bytes."""
        key = cost.tobytes()
        hit = self._path_cache.get(key)
        if hit is None:
            hit = open_path_cost(cost)
            if len(self._path_cache) > _CACHE_MAX // 4:
                self._path_cache.clear()
            self._path_cache[key] = hit
        return hit

    def pair_matrices(self, groups: list[list[int]] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        members = np.asarray(groups, dtype=np.int64)
        keys = [self.key(m) for m in members]
        p = len(members)
        b = np.zeros((p, p))
        s = np.zeros((p, p))
        for x in range(p):
            for y in range(p):
                if x == y or (self.symmetric and y < x):
                    continue
                b[x, y], s[x, y] = self.pair(members[x], members[y], keys[x], keys[y])
                if self.symmetric:
                    b[y, x], s[y, x] = b[x, y], s[x, y]
        return b, s

    def group_terms(self, members: np.ndarray, sdel: np.ndarray, sinv: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        """(compute_s, dp per group, layers per group, penalty) for the member matrix (P, D).

        ``sdel[d, g]``/``sinv[d, g]``: sums of a0/a1 over group g's members for device d.
        """
        cols = np.arange(self.p)[:, None]
        d0 = sdel[members, cols]  # (P, D)
        d1 = sinv[members, cols]
        if not self.hetero:
            dp = (d0 + self.c_dp_const * d1).max(axis=1)
            return 0.0, dp, self.equal_layers, 0.0
        spl = self.sec_per_layer[members].max(axis=1)  # slowest member sets the pace
        caps = self.model.layer_caps(self.memory[members].min(axis=1))
        g = self.model.grad_bytes_per_layer
        if self.balance_layers:
            layers, missing = allocate_layers(self.model, spl, caps, d0, g * d1)
        else:  # symmetric baseline: equal counts, the extra layers on the fastest stages
            layers = np.empty(self.p, dtype=np.int64)
            layers[np.argsort(spl, kind="stable")] = self.equal_layers
            missing = int(np.maximum(layers - caps, 0).sum())
        missing += int((layers < 1).sum())  # a stage that cannot hold one layer
        comp, _ = self.model.compute_s(layers, spl)
        dp = (d0 + layers[:, None] * g * d1).max(axis=1)
        return comp, dp, layers, UNPLACED_PENALTY_S * missing

    def sums(self, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sdel, sinv (N, P) for a member matrix."""
        sdel = np.stack([self.a0[:, m].sum(axis=1) for m in members], axis=1)
        sinv = np.stack([self.a1[:, m].sum(axis=1) for m in members], axis=1)
        return sdel, sinv

    def combine(self, comp: float, dp: np.ndarray, b: np.ndarray, s: np.ndarray, penalty: float) -> tuple[float, float]:
        """(true, surrogate) scores."""
        pp_true = self.path_cost(b)
        pp_soft = self.path_cost(s)
        base = comp + float(dp.max()) + penalty
        return base + 2.0 * pp_true, base + LAMBDA_DP * float(dp.mean()) + 2.0 * pp_soft

    def evaluate(self, groups: list[list[int]]) -> tuple[float, float]:
        members = np.asarray(groups, dtype=np.int64)
        sdel, sinv = self.sums(members)
        comp, dp, _, pen = self.group_terms(members, sdel, sinv)
        b, s = self.pair_matrices(groups)
        return self.combine(comp, dp, b, s, pen)

