"""The search against exhaustive enumeration, determinism, and small-cluster speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from swarm.scheduling import Cluster, Device, JobShape, evaluate_plan, plan_training
from swarm.scheduling.costs import dp_matrix, pp_matrix
from swarm.scheduling.problem import Problem
from swarm.scheduling.search import search

from conftest import clustered, dtfm_job


def brute_force_grid_cost(cluster: Cluster, job: JobShape, dp: int, pp: int) -> float:
    """Min over EVERY assignment of devices to (pipeline, stage) of the fixed-assignment cost."""
    n = cluster.num_devices
    a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_dp_bytes, dp)
    w = pp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_pp_bytes)
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
    grid = perms.reshape(-1, dp, pp)  # [k, pipeline i, stage j]
    dp_cost = np.zeros(len(grid))
    for j in range(pp):
        g = grid[:, :, j]
        dp_cost = np.maximum(dp_cost, a[g[:, :, None], g[:, None, :]].sum(axis=2).max(axis=1))
    pp_cost = np.zeros(len(grid))
    for j in range(pp - 1):
        pp_cost += w[grid[:, :, j], grid[:, :, j + 1]].max(axis=1)
    return float((dp_cost + 2.0 * pp_cost).min())


@pytest.mark.parametrize("dp,pp", [(2, 4), (4, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("asymmetric,noise", [(False, True), (True, True), (False, False)])
def test_search_finds_exhaustive_optimum_8_devices(dp, pp, seed, asymmetric, noise):
    # noise=False: devices of a region are exactly interchangeable (equivalence classes,
    # skipped swaps and the class-keyed pair cache are exercised)
    cluster = clustered(8, regions=3, seed=seed, asymmetric=asymmetric, noise=noise)
    job = dtfm_job(dp, pp)
    best = brute_force_grid_cost(cluster, job, dp, pp)
    # the evolutionary search itself (enumeration of small instances switched off)
    res = search(Problem(cluster, job, dp, pp, hetero=False), seed=seed, time_budget_s=10.0, exhaustive_max=0)
    assert res.true == pytest.approx(best, rel=1e-9)
    assert not res.timed_out
    # plan_training (enumerates partitions this small), costs recomputed from the formulas
    plan = plan_training(cluster, job, seed=seed, time_budget_s=10.0)
    assert plan.objective == "dtfm_comm"
    assert plan.cost_s == pytest.approx(best, rel=1e-9)
    # the plan's own pipelines (a fixed assignment) reach that cost too
    assert evaluate_plan(cluster, job, plan).cost_s == pytest.approx(best, rel=1e-9)


def _partitions(items: list[int], size: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = [x for x in rest if x not in others]
        for tail in _partitions(left, size):
            yield [[first, *others], *tail]


@pytest.mark.parametrize("dp,pp", [(2, 4), (4, 2)])
@pytest.mark.parametrize("seed", [7, 8])
def test_heterogeneous_search_finds_best_partition(dp, pp, seed):
    tflops = [300, 300, 150, 150, 80, 80, 80, 40]
    cluster = clustered(8, regions=2, seed=seed, tflops=tflops, memory=[80 << 30] * 8)
    job = JobShape(num_layers=16, hidden_size=2048, seq_len=1024, num_params=1.3e9, global_batch_seqs=64, micro_batch_seqs=2)
    prob = Problem(cluster, job, dp, pp, hetero=True)
    best = min(prob.evaluate(p)[0] for p in _partitions(list(range(8)), dp))
    for seed in (0, 1):
        res = search(prob, seed=seed, time_budget_s=10.0, exhaustive_max=0)
        assert res.true == pytest.approx(best, rel=1e-9)


def test_deterministic_for_a_seed():
    cluster = clustered(12, regions=3, seed=5)
    job = dtfm_job(3, 4)
    a = plan_training(cluster, job, seed=11, time_budget_s=20.0).to_json()
    b = plan_training(cluster, job, seed=11, time_budget_s=20.0).to_json()
    for x in (a, b):
        x.pop("search_s")
    assert a == b
    assert not a["breakdown"]["timed_out"]


def test_tiny_cluster_is_fast_and_chooses_degrees():
    n = 3
    cluster = Cluster(
        devices=tuple(Device(id=f"cpu{i}", tflops=0.2, memory_bytes=4 << 30) for i in range(n)),
        delay_s=np.full((n, n), 2e-4),
        bandwidth_Bps=np.full((n, n), 1e9),
    )
    job = JobShape(num_layers=4, hidden_size=64, seq_len=64, num_params=2e5, global_batch_seqs=12, micro_batch_seqs=2)
    t0 = time.perf_counter()
    plan = plan_training(cluster, job, seed=0, time_budget_s=0.5)
    assert time.perf_counter() - t0 < 1.0
    assert (plan.d_dp, plan.d_pp) in ((1, 3), (3, 1))
    assert {c["d_dp"] for c in plan.breakdown["candidates"]} == {1, 3}
    assert sorted(d for s in plan.stages for d in s.devices) == ["cpu0", "cpu1", "cpu2"]
    forced = plan_training(cluster, job, seed=0, time_budget_s=0.5, dp=1, pp=3)
    assert [s.layers for s in forced.stages] == [(0, 2), (2, 3), (3, 4)]  # 4 layers over 3 stages


def test_shuffled_ids_give_the_same_cost():
    cluster = clustered(16, regions=4, seed=9)
    job = dtfm_job(4, 4)
    perm = np.random.default_rng(0).permutation(16)
    shuffled = Cluster(
        devices=tuple(cluster.devices[i] for i in perm),
        delay_s=cluster.delay_s[np.ix_(perm, perm)],
        bandwidth_Bps=cluster.bandwidth_Bps[np.ix_(perm, perm)],
    )
    a = plan_training(cluster, job, seed=0, time_budget_s=10.0)
    b = plan_training(shuffled, job, seed=0, time_budget_s=10.0)
    assert a.cost_s == pytest.approx(b.cost_s, rel=1e-9)


def test_equivalence_classes_follow_the_matrices():
    cluster = clustered(9, regions=3, seed=4, noise=False)
    job = dtfm_job(3, 3)
    prob = Problem(cluster, job, 3, 3, hetero=False)
    regions = [d.region for d in cluster.devices]
    for i in range(9):
        for j in range(9):
            assert (prob.classes[i] == prob.classes[j]) == (regions[i] == regions[j])
    noisy = Problem(clustered(9, regions=3, seed=4), job, 3, 3, hetero=False)
    assert len(set(noisy.classes.tolist())) == 9


def test_open_degrees_prefer_whole_micro_batches():
    from swarm.scheduling.planner import degree_candidates

    job = JobShape(num_layers=8, hidden_size=64, seq_len=64, num_params=1e6, global_batch_seqs=12, micro_batch_seqs=2)
    # 12 devices, pp <= 8 layers: dp in {12, 6, 4, 3, 2}; 12 / dp / 2 must be whole -> {6, 3, 2}
    assert sorted(d for d, _ in degree_candidates(12, job, None, None)) == [2, 3, 6]
    odd = JobShape(num_layers=8, hidden_size=64, seq_len=64, num_params=1e6, global_batch_seqs=7.5, micro_batch_seqs=2)
    assert len(degree_candidates(4, odd, None, None)) == 3  # none divides: all are kept


def test_homogeneous_known_speed_chooses_degrees_by_compute_too():
    n = 3
    cluster = Cluster(
        devices=tuple(Device(id=f"cpu{i}", tflops=0.05, memory_bytes=4 << 30) for i in range(n)),
        delay_s=np.full((n, n), 2e-4),
        bandwidth_Bps=np.full((n, n), 1e9),
    )
    job = JobShape(num_layers=4, hidden_size=256, seq_len=256, num_params=4e6, global_batch_seqs=12, micro_batch_seqs=2)
    plan = plan_training(cluster, job, seed=0, time_budget_s=0.5)
    assert plan.objective == "dtfm_comm"
    cands = {(c["d_dp"], c["d_pp"]) for c in plan.breakdown["candidates"]}
    assert cands == {(3, 1), (1, 3)}
    # data parallel: 2 micro-batches of the whole model per device; pipeline: 6 micro-batches
    # through stages of 2, 1, 1 layers (bubble): compute decides for data parallelism here
    assert (plan.d_dp, plan.d_pp) == (3, 1)
    assert plan.breakdown["predicted_compute_s"] > 0
