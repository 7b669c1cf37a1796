"""The DT-FM cost model against hand-computed examples, brute force and the scenario files."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.scheduling.cluster import load_cluster_file
from swarm.scheduling.costs import dp_matrix, fixed_assignment_cost, grid_from_partition, partition_cost, pp_matrix
from swarm.scheduling.matching import bottleneck_matching
from swarm.scheduling.tsp import open_path

from conftest import REFERENCE


def test_hand_computed_four_devices():
    # Devices 0,1 share a fast host; 2,3 another; hosts linked slowly. D_DP = 2, D_PP = 2.
    delay = np.array([[0, 0.001, 0.01, 0.01], [0.001, 0, 0.01, 0.01], [0.01, 0.01, 0, 0.001], [0.01, 0.01, 0.001, 0]])
    bw = np.array([[1, 100, 1, 1], [100, 1, 1, 1], [1, 1, 1, 100], [1, 1, 100, 1]], dtype=float) * 1e8
    c_dp, c_pp = 4e8, 1e8
    a = dp_matrix(delay, bw, c_dp, 2)
    w = pp_matrix(delay, bw, c_pp)
    # A[0][1] = 2 * (0.001 + 4e8 / (2 * 1e10)) = 2 * 0.021 = 0.042; A[0][2] = 2 * (0.01 + 2) = 4.02
    assert a[0, 1] == pytest.approx(0.042)
    assert a[0, 2] == pytest.approx(4.02)
    # W[0][1] = 0.001 + 1e8 / 1e10 = 0.011; W[0][2] = 0.01 + 1 = 1.01
    assert w[0, 1] == pytest.approx(0.011)
    assert w[0, 2] == pytest.approx(1.01)
    # Groups inside hosts: DP = 0.042, one slow boundary: PP = 1.01 -> total 0.042 + 2.02
    inside = partition_cost(a, w, [[0, 1], [2, 3]])
    assert inside.dp == pytest.approx(0.042)
    assert inside.pp == pytest.approx(1.01)
    assert inside.total == pytest.approx(2.062)
    # Groups across hosts: DP = 4.02, the boundary matches host-mates: PP = 0.011 -> 4.042
    across = partition_cost(a, w, [[0, 2], [1, 3]])
    assert across.dp == pytest.approx(4.02)
    assert across.pp == pytest.approx(0.011)
    assert across.total == pytest.approx(4.042)
    grid = grid_from_partition([[0, 2], [1, 3]], across)
    total, dp, pp = fixed_assignment_cost(a, w, grid)
    assert total == pytest.approx(across.total)
    assert {(grid[0][i], grid[1][i]) for i in range(2)} in ({(0, 1), (2, 3)}, {(1, 0), (3, 2)})


def test_hand_computed_three_groups_order():
    # Pair costs of 3 single-device groups: the best open path is 0 - 2 - 1 (1 + 2 = 3).
    cost = np.array([[0, 5.0, 1.0], [5.0, 0, 2.0], [1.0, 2.0, 0]])
    total, order = open_path(cost)
    assert total == 3.0
    assert order in ([0, 2, 1], [1, 2, 0])


def test_bottleneck_hand_example():
    w = np.array([[1.0, 9.0, 9.0], [9.0, 2.0, 3.0], [9.0, 3.0, 8.0]])
    r = bottleneck_matching(w, want_deficiency=True)
    # perfect matchings avoiding 9: 0-0, 1-1, 2-2 (max 8) or 0-0, 1-2, 2-1 (max 3)
    assert r.value == 3.0
    assert max(w[i, r.perm[i]] for i in range(3)) == 3.0
    # below 3 only 0-0 and 1-1 can be matched: one pipeline still needs a link of cost 3
    assert r.below == 2.0 and r.deficiency == 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), levels=st.integers(1, 6))
def test_bottleneck_matches_brute_force(n, seed, levels):
    w = np.random.default_rng(seed).integers(0, levels, size=(n, n)).astype(float)
    r = bottleneck_matching(w, want_deficiency=True)
    best = min(max(w[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    assert r.value == best
    assert sorted(r.perm) == list(range(n)) and max(w[i, r.perm[i]] for i in range(n)) == best
    if (w < best).any():
        below = max(sum(w[i, p[i]] < best for i in range(n)) for p in itertools.permutations(range(n)))
        assert r.deficiency == n - below


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_open_path_matches_brute_force(n, seed):
    c = np.random.default_rng(seed).random((n, n))  # asymmetric
    total, order = open_path(c)
    best = min(sum(c[a, b] for a, b in zip(p, p[1:])) for p in itertools.permutations(range(n)))
    assert total == pytest.approx(best, abs=1e-12)
    assert sorted(order) == list(range(n))
    assert sum(c[a, b] for a, b in zip(order, order[1:])) == pytest.approx(best, abs=1e-12)


def test_open_path_heuristic_beyond_exact_limit_is_a_valid_path():
    c = np.random.default_rng(3).random((16, 16))
    total, order = open_path(c)
    assert sorted(order) == list(range(16))
    assert total == pytest.approx(sum(c[a, b] for a, b in zip(order, order[1:])))


def test_scenario_costs_equal_reference(scenario_files):
    """Naive and DT-FM-best plans of the reference reproduce its numbers exactly."""
    if not REFERENCE.exists():
        pytest.skip("reference file not present")
    ref = json.loads(REFERENCE.read_text())
    for path in scenario_files:
        cluster, job = load_cluster_file(path)
        r = ref[path.stem]
        a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_dp_bytes, 8)
        w = pp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_pp_bytes)
        naive = [[i * 8 + s for i in range(8)] for s in range(8)]  # device d: stage d % 8, pipeline d // 8
        total, dp, pp = fixed_assignment_cost(a, w, naive)
        assert total == pytest.approx(r["naive_cost"], rel=1e-12)
        assert dp == pytest.approx(r["naive_cost_dp_pp_x2"][0], rel=1e-12)
        best = r["dtfm_ga_best_assignment"]["dp_groups_in_stage_order"]
        assert partition_cost(a, w, best).total == pytest.approx(r["dtfm_ga_cost_min"], rel=1e-12)
