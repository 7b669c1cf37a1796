"""Training scheduler: DT-FM's partitioner, extended to heterogeneous GPUs (DESIGN.md 3.2-3.4).

Pure library code: no network, no clock reads except through an injected clock, numpy only.

API summary (what the coordinator and the CLI use)::

    from swarm.scheduling import (Cluster, Device, JobShape, Plan, plan_training,
                                  load_cluster_file)
    from swarm.errors import InfeasiblePlanError

    cluster = Cluster(
        devices=(Device(id="node-a", tflops=10.0, memory_bytes=8 << 30), ...),
        delay_s=np.array(...),        # (N, N) one-way delay in seconds, diagonal ignored
        bandwidth_Bps=np.array(...),  # (N, N) bytes per second, diagonal ignored
    )
    job = JobShape(num_layers=4, hidden_size=64, seq_len=128, num_params=2e5,
                   global_batch_seqs=32, micro_batch_seqs=4)
    plan = plan_training(cluster, job, seed=0, time_budget_s=0.5)   # dp/pp: None = search
    # (balance_layers=False: equal layer counts, the symmetric baseline)
    plan.stages            # tuple[PlanStage], pipeline order; stage.layers = (first, last_exclusive)
    plan.stages[s].devices # device ids; the i-th id of every stage forms pipeline i
    plan.cost_s            # DT-FM comm cost (homogeneous) or predicted iteration time
    plan.to_json(); Plan.from_json(obj)   # stable plain-JSON form
    plan.pipeline(i)       # device ids of pipeline i, stage 0 first

    cluster, job = load_cluster_file("scenario.json")  # the bench/scenario format; `swarm plan`
    evaluate_plan(cluster, job, plan)   # re-score a given plan (e.g. after links were re-measured)

- ``plan_training`` raises :class:`swarm.errors.InfeasiblePlanError` when the layers cannot fit
  in memory (the message names the layers and the missing bytes) or ``dp * pp`` does not match
  the device count, and :class:`swarm.errors.InvalidRequestError` on malformed input.
- A cluster is *homogeneous* when every device has the same (or unknown) TFLOPS and memory: the
  plan then minimises the DT-FM communication cost (DP + 2 * PP) with equal layer counts. Else
  it minimises a predicted iteration time (compute with pipeline bubble + communication) with
  layer counts balanced by each stage's slowest member and memory checked for every member.
- Deterministic for a seed as long as the search converges before ``time_budget_s``; tiny
  clusters (a few devices) are solved exactly, in milliseconds.
- Unknown TFLOPS count as the median of the known ones; unknown memory is not checked. With
  open degrees, data-parallel degrees that split the batch into whole micro-batches are
  preferred. ``JobShape.recompute`` models activation recomputation (less memory, more compute).

Modules: ``cluster`` (devices, links, job shape, file loading), ``costs`` (the DT-FM cost
model), ``matching`` (bottleneck matching), ``tsp`` (open-loop pipeline order), ``search``
(evolutionary bi-level search), ``hetero`` (layer allocation, memory, predicted time),
``plan`` (the Plan dataclasses), ``planner`` (``plan_training``). ``placement`` is inference.
"""

from swarm.scheduling.cluster import Cluster, Device, JobShape, load_cluster_file
from swarm.scheduling.evaluate import evaluate_plan
from swarm.scheduling.plan import Plan, PlanStage
from swarm.scheduling.planner import plan_training

__all__ = [
    "Cluster",
    "Device",
    "JobShape",
    "Plan",
    "PlanStage",
    "evaluate_plan",
    "load_cluster_file",
    "plan_training",
]
