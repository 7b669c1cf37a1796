"""``plan_training``: choose D_DP x D_PP, the stage groups, their order and layer counts."""

from __future__ import annotations

import logging
import math

import numpy as np

from swarm.clock import Clock, SystemClock
from swarm.errors import InfeasiblePlanError, InvalidRequestError
from swarm.scheduling.cluster import Cluster, JobShape
from swarm.scheduling.costs import dp_matrix, grid_from_partition, partition_cost
from swarm.scheduling.plan import Plan, PlanStage
from swarm.scheduling.problem import Problem
from swarm.scheduling.search import search

log = logging.getLogger(__name__)
GIB = float(1 << 30)


def degree_candidates(n: int, job: JobShape, dp: int | None, pp: int | None) -> list[tuple[int, int]]:
    """(dp, pp) pairs to try; raises InfeasiblePlanError when the given ones cannot work."""
    dp = dp if dp is not None else job.dp
    pp = pp if pp is not None else job.pp
    if dp is not None and pp is not None:
        if dp * pp != n:
            raise InfeasiblePlanError(f"dp={dp} x pp={pp} = {dp * pp} devices, but the cluster has {n}; pick degrees whose product is {n}")
        if pp > job.num_layers:
            raise InfeasiblePlanError(f"pp={pp} stages for {job.num_layers} layers: every stage needs a layer; use pp <= {job.num_layers}")
        return [(dp, pp)]
    if dp is not None:
        if n % dp:
            raise InfeasiblePlanError(f"dp={dp} does not divide the {n} devices; pick a divisor of {n}")
        return degree_candidates(n, job, dp, n // dp)
    if pp is not None:
        if n % pp:
            raise InfeasiblePlanError(f"pp={pp} does not divide the {n} devices; pick a divisor of {n}")
        return degree_candidates(n, job, n // pp, pp)
    out = [(n // p, p) for p in range(1, n + 1) if n % p == 0 and p <= job.num_layers]
    if not out:
        raise InfeasiblePlanError(f"{n} devices cannot be split into at most {job.num_layers} stages")
    # prefer data-parallel degrees that split the batch into whole micro-batches per pipeline
    whole = [(d, p) for d, p in out if _whole(job.global_batch_seqs / d / job.micro_batch_seqs)]
    return whole or out


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9 and round(x) >= 1


def _memory_error(prob: Problem, groups: list[list[int]], layers: np.ndarray | None = None) -> InfeasiblePlanError:
    model = prob.model
    members = np.asarray(groups, dtype=np.int64)
    caps = model.layer_caps(prob.memory[members].min(axis=1))
    fit = int(min(caps.sum(), model.num_layers))
    if layers is not None:  # a fixed split (equal layers): what exceeds each stage's room
        fit = model.num_layers - int(np.maximum(np.asarray(layers) - caps, 0).sum())
    missing_layers = model.num_layers - fit
    short = missing_layers * model.layer_memory_bytes
    return InfeasiblePlanError(
        f"with dp={prob.d} x pp={prob.p}, layers {fit}-{model.num_layers - 1} ({missing_layers} of "
        f"{model.num_layers}) do not fit: each layer needs {model.layer_memory_bytes / GIB:.3f} GiB on every "
        f"member of its stage (training state + activations of in-flight micro-batches) and the stages' "
        f"smallest members hold {caps.tolist()} layers; {short / GIB:.3f} GiB are missing. Add nodes with "
        f"more memory, lower the micro-batch size, or use more pipeline stages"
    )


def _build(prob: Problem, groups: list[list[int]], *, seed: int, extra: dict) -> Plan:
    """The Plan for a partition, with costs recomputed exactly from the formulas."""
    cluster = prob.cluster
    ids = cluster.ids
    if not prob.hetero:
        a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, prob.c_dp_const, prob.d)
        pc = partition_cost(a, prob.w, groups)
        order = list(pc.order)
        layers_by_group = {g: int(prob.equal_layers[k]) for k, g in enumerate(order)}
        compute_s = 0.0
        stage_compute = {g: None for g in order}
        dp_s, pp_s = pc.dp, pc.pp
        group_dp = {g: pc.group_dp[g] for g in order}
        if np.isfinite(prob.memory).all():
            caps = prob.model.layer_caps(prob.memory[np.asarray(groups)].min(axis=1))
            if (prob.equal_layers.max() > caps).any():
                raise _memory_error(prob, groups)
        cost = pc.total
        objective = "dtfm_comm"
        if all(d.tflops is not None for d in cluster.devices):
            # known (equal) speed: the compute this split implies, to compare dp x pp choices
            extra = {**extra, "predicted_compute_s": prob.model.compute_s(prob.equal_layers, prob.sec_per_layer[: prob.p])[0]}
    else:
        members = np.asarray(groups, dtype=np.int64)
        sdel, sinv = prob.sums(members)
        spl = prob.sec_per_layer[members].max(axis=1)
        g = prob.model.grad_bytes_per_layer
        _, _, layers, penalty = prob.group_terms(members, sdel, sinv)
        if penalty:
            raise _memory_error(prob, groups, layers)
        compute_s, t = prob.model.compute_s(layers, spl)
        # exact DP per group from the formula with this group's gradient bytes
        group_dp = {}
        for k, grp in enumerate(groups):
            a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, g * int(layers[k]), prob.d)
            group_dp[k] = float(a[np.ix_(grp, grp)].sum(axis=1).max()) if len(grp) > 1 else 0.0
        pc = partition_cost(np.zeros_like(prob.w), prob.w, groups)
        order = list(pc.order)
        layers_by_group = {k: int(layers[k]) for k in range(prob.p)}
        stage_compute = {k: float(t[k]) for k in range(prob.p)}
        dp_s, pp_s = max(group_dp.values()), pc.pp
        cost = compute_s + dp_s + 2.0 * pp_s
        objective = "predicted_iteration"
    columns = grid_from_partition(groups, pc)
    stages = []
    first = 0
    mem_per_layer = prob.model.layer_memory_bytes
    for k, g in enumerate(order):
        n_layers = layers_by_group[g]
        stages.append(
            PlanStage(
                layers=(first, first + n_layers),
                devices=tuple(ids[d] for d in columns[k]),
                compute_s=stage_compute[g],
                dp_s=group_dp[g],
                memory_bytes=n_layers * mem_per_layer,
            )
        )
        first += n_layers
    breakdown = {
        "dp_s": dp_s,
        "pp_s": pp_s,
        "pp_total_s": 2.0 * pp_s,
        "compute_s": compute_s,
        "boundary_s": list(pc.boundary),
        "stage_layers": [s.num_layers for s in stages],
        "num_microbatches": prob.model.num_microbatches,
        "c_dp_bytes_per_layer": prob.model.grad_bytes_per_layer,
        "c_pp_bytes": prob.c_pp,
        "c_pp_backward_bytes": prob.c_pp_backward,
        **extra,
    }
    if objective == "predicted_iteration":
        breakdown["stage_compute_s"] = [s.compute_s for s in stages]
        breakdown["stage_tflops_min"] = [float(min(prob.tflops[d] for d in columns[k])) for k in range(prob.p)]
        breakdown["bubble_s"] = compute_s - (prob.model.num_microbatches) * max(stage_compute.values())
    return Plan(stages=tuple(stages), objective=objective, cost_s=cost, dp_s=dp_s, pp_s=pp_s, compute_s=compute_s, seed=seed, breakdown=breakdown)


def _rank(plan: Plan) -> float:
    """How dp x pp candidates compare: the objective, plus the compute a DT-FM plan implies
    when the (equal) device speed is known (the DT-FM cost alone ignores the pipeline bubble)."""
    return plan.cost_s + float(plan.breakdown.get("predicted_compute_s", 0.0))


def plan_training(
    cluster: Cluster,
    job: JobShape,
    *,
    seed: int = 0,
    time_budget_s: float = 5.0,
    dp: int | None = None,
    pp: int | None = None,
    clock: Clock | None = None,
    balance_layers: bool = True,
) -> Plan:
    """Plan a training job over every device of ``cluster`` (see the package docstring).

    ``dp``/``pp`` override the job's degrees; None on both sides searches all factorizations of
    the device count (with at most ``num_layers`` stages). ``balance_layers=False`` keeps equal
    layer counts on heterogeneous clusters (the symmetric baseline). Raises InfeasiblePlanError.
    """
    if not (isinstance(time_budget_s, (int, float)) and math.isfinite(time_budget_s) and time_budget_s > 0):
        raise InvalidRequestError(f"time_budget_s must be > 0, got {time_budget_s!r}")
    clock = clock or SystemClock()
    start = clock.monotonic()
    cands = degree_candidates(cluster.num_devices, job, dp, pp)
    hetero = not cluster.is_homogeneous()
    best: Plan | None = None
    tried = []
    errors: list[InfeasiblePlanError] = []
    for k, (d, p) in enumerate(cands):
        left = time_budget_s - (clock.monotonic() - start)
        # keep a little of the share for building the plan (exact costs, matchings)
        share = max(0.93 * left / (len(cands) - k), 1e-3)
        prob = Problem(cluster, job, d, p, hetero=hetero, balance_layers=balance_layers)
        res = search(prob, seed=seed, time_budget_s=share, clock=clock)
        try:
            plan = _build(prob, res.groups, seed=seed, extra={"evaluations": res.evals, "generations": res.generations, "timed_out": res.timed_out})
        except InfeasiblePlanError as e:
            errors.append(e)
            tried.append({"d_dp": d, "d_pp": p, "cost_s": None})
            continue
        tried.append({"d_dp": d, "d_pp": p, "cost_s": plan.cost_s})
        if best is None or _rank(plan) < _rank(best):
            best = plan
    if best is None:
        raise errors[-1] if len(errors) == 1 else InfeasiblePlanError(
            "no dp x pp split fits in memory: " + "; ".join(str(e) for e in errors[-3:])
        )
    elapsed = clock.monotonic() - start
    breakdown = dict(best.breakdown)
    if len(cands) > 1:
        breakdown["candidates"] = tried
    log.info("planned d_dp=%d d_pp=%d cost_s=%.4f search_s=%.3f", best.d_dp, best.d_pp, best.cost_s, elapsed)
    return Plan(
        stages=best.stages,
        objective=best.objective,
        cost_s=best.cost_s,
        dp_s=best.dp_s,
        pp_s=best.pp_s,
        compute_s=best.compute_s,
        search_s=elapsed,
        seed=seed,
        breakdown=breakdown,
    )
