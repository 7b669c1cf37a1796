"""Score a given plan (fixed stages, layer counts and pipelines) under the scheduler's models.

``evaluate_plan`` re-computes what ``plan_training`` predicts, for a plan built elsewhere: a
hand-written one, a symmetric baseline, or the current plan after the links were re-measured.
The plan is taken as a *fixed assignment*: pipeline i runs through the i-th device of every
stage, so each boundary costs ``max_i W[stage_j[i]][stage_{j+1}[i]]`` (no re-matching).
"""

from __future__ import annotations

import numpy as np

from swarm.errors import InfeasiblePlanError, InvalidRequestError
from swarm.scheduling.cluster import Cluster, JobShape
from swarm.scheduling.costs import dp_matrix, pipeline_matrix
from swarm.scheduling.hetero import EFFICIENCY, StageModel, device_arrays
from swarm.scheduling.plan import Plan, PlanStage


def evaluate_plan(cluster: Cluster, job: JobShape, plan: Plan, *, objective: str | None = None) -> Plan:
    """The same plan with its costs recomputed; ``objective`` None: the cluster decides.

    Raises InvalidRequestError if the plan names unknown devices or does not cover the
    model's layers, InfeasiblePlanError if a stage does not fit in a member's memory.
    """
    index = {d.id: k for k, d in enumerate(cluster.devices)}
    try:
        columns = [[index[x] for x in st.devices] for st in plan.stages]
    except KeyError as e:
        raise InvalidRequestError(f"plan names device {e.args[0]!r} that is not in the cluster") from None
    if plan.num_layers != job.num_layers:
        raise InvalidRequestError(f"plan covers {plan.num_layers} layers, the job has {job.num_layers}")
    d_dp, d_pp = plan.d_dp, plan.d_pp
    objective = objective or ("dtfm_comm" if cluster.is_homogeneous() else "predicted_iteration")
    model = StageModel.build(job, d_dp, d_pp)
    tflops, memory = device_arrays(cluster)
    layers = np.array([st.num_layers for st in plan.stages], dtype=np.int64)
    w = pipeline_matrix(cluster.delay_s, cluster.bandwidth_Bps, model.c_pp_bytes, model.c_pp_backward_bytes)
    boundary = [float(max(w[a, b] for a, b in zip(c0, c1))) for c0, c1 in zip(columns, columns[1:])]
    pp_s = float(sum(boundary))
    even = job.num_layers % d_pp == 0 and len(set(layers.tolist())) == 1
    stages = []
    group_dp = []
    stage_t = []
    for k, (st, col) in enumerate(zip(plan.stages, columns)):
        if objective == "dtfm_comm" and even and job.c_dp_bytes is not None:
            c_dp = job.c_dp_bytes
        else:
            c_dp = model.grad_bytes_per_layer * int(layers[k])
        a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, c_dp, d_dp)
        g_dp = float(a[np.ix_(col, col)].sum(axis=1).max()) if len(col) > 1 else 0.0
        need = int(layers[k]) * model.layer_memory_bytes
        have = float(memory[col].min())
        if need > have:
            worst = cluster.devices[col[int(np.argmin(memory[col]))]].id
            raise InfeasiblePlanError(
                f"device {worst} cannot hold layers {st.layers[0]}-{st.layers[1] - 1} (needs {need / 2**30:.3f} GiB, "
                f"has {have / 2**30:.3f} GiB); give that stage fewer layers or a device with more memory"
            )
        t = int(layers[k]) * model.flops_per_layer_microbatch / (float(tflops[col].min()) * 1e12 * EFFICIENCY)
        group_dp.append(g_dp)
        stage_t.append(t)
        stages.append(PlanStage(layers=st.layers, devices=st.devices, compute_s=t if objective != "dtfm_comm" else None, dp_s=g_dp, memory_bytes=need))
    dp_s = max(group_dp)
    compute_s = 0.0
    if objective == "predicted_iteration":
        compute_s = float(sum(stage_t) + (model.num_microbatches - 1) * max(stage_t))
    cost = compute_s + dp_s + 2.0 * pp_s
    breakdown = {
        "dp_s": dp_s,
        "pp_s": pp_s,
        "pp_total_s": 2.0 * pp_s,
        "compute_s": compute_s,
        "boundary_s": boundary,
        "stage_layers": layers.tolist(),
        "num_microbatches": model.num_microbatches,
    }
    if objective == "predicted_iteration":
        breakdown["stage_compute_s"] = stage_t
        breakdown["stage_tflops_min"] = [float(tflops[c].min()) for c in columns]
    return Plan(stages=tuple(stages), objective=objective, cost_s=cost, dp_s=dp_s, pp_s=pp_s, compute_s=compute_s, search_s=plan.search_s, seed=plan.seed, breakdown=breakdown)

