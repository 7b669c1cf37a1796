"""Turn a job and a snapshot of the swarm into a plan and per-node stage assignments (pure).

Nodes: the online nodes not busy with another running job, ordered by id (deterministic).
Links not measured yet get a conservative default (see ``DEFAULT_*``) so a fresh swarm can
still be planned; measured links replace them as soon as the coordinator has them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from swarm.errors import InfeasiblePlanError, InvalidRequestError
from swarm.job_spec import JobSpec
from swarm.membership import NodeInfo
from swarm.model.config import ModelConfig
from swarm.scheduling import Cluster, Device, JobShape, Plan, plan_training
from swarm.scheduling.evaluate import evaluate_plan

DEFAULT_DELAY_S = 0.005  # unmeasured link: assume a LAN-ish 5 ms
DEFAULT_BANDWIDTH_BPS = 12.5e6  # unmeasured link: assume 100 Mbit/s
PLAN_TIME_BUDGET_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPlan:
    plan: Plan
    assignments: list[dict[str, Any]]


def _fill(m: np.ndarray, default: float) -> np.ndarray:
    out = np.array(m, dtype=np.float64)
    bad = ~np.isfinite(out) | (out <= 0)
    np.fill_diagonal(bad, False)
    out[bad] = default
    return out


def plan_job(
    *,
    spec: JobSpec,
    config: ModelConfig,
    nodes: list[NodeInfo],
    delay_s: np.ndarray,
    bandwidth_Bps: np.ndarray,
    seed: int = 0,
    tflops: dict[str, float] | None = None,
    prefer: frozenset[str] = frozenset(),
) -> JobPlan:
    """Plan ``spec`` over ``nodes`` (with their delay/bandwidth matrices, same order).

    Uses ``spec.num_stages`` x ``spec.num_replicas`` nodes when both are set (the fastest, at
    ``tflops`` or their planning speed; ties by id), else every node with the planner choosing the
    split. Boundary traffic is priced from
    ``spec.codec`` in both directions (activations forward, gradients backward, AQ-SGD at its
    steady state; see :meth:`~swarm.compression.CodecSpec.forward_bytes_per_value`). Raises
    InfeasiblePlanError with the reason (no nodes, too few nodes for the flags, not enough
    memory) and InvalidRequestError when ``--stages`` exceeds the model's layers. ``tflops``:
    speeds to plan with instead of the nodes' (a re-balance: the speeds seen in training).
    ``prefer``: nodes a fixed shape takes before faster ones (both ends of a disputed spot check,
    which must each be checked by someone else: coordinator/jobs/spotchecks.py).
    """
    check_shape(spec, config, num_nodes=len(nodes), where="idle")
    speed = lambda n: (tflops or {}).get(n.id, n.planning_tflops)  # noqa: E731 -- as _cluster_and_shape
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i].id not in prefer, -speed(nodes[i]), nodes[i].id))
    pp = spec.num_stages or None
    dp = spec.num_replicas or None
    # Fixed shapes take a whole number of pipelines: the fastest nodes (ties by id: deterministic),
    # the rest stay idle (a slow volunteer is left out while faster ones wait; a running job takes
    # in a faster newcomer the same way, coordinator/jobs/fencing.py ``_maybe_absorb``).
    # check_shape guaranteed at least one pipeline's worth, so never empty.
    if pp and dp:
        order = order[: pp * dp]
    elif pp:
        order = order[: len(order) - len(order) % pp]
    elif dp:
        order = order[: len(order) - len(order) % dp]
    assert order, "check_shape lets no empty node list through"
    chosen = [nodes[i] for i in order]
    cluster, shape = _cluster_and_shape(spec, config, chosen, np.asarray(delay_s)[np.ix_(order, order)],
                                        np.asarray(bandwidth_Bps)[np.ix_(order, order)], tflops, dp=dp, pp=pp)
    plan = plan_training(cluster, shape, seed=seed, time_budget_s=PLAN_TIME_BUDGET_S)
    _check_batch(spec, plan.d_dp)
    by_id = {n.id: n for n in chosen}
    return JobPlan(plan=plan, assignments=assignments_from_plan(plan, by_id))


def _cluster_and_shape(spec: JobSpec, config: ModelConfig, chosen: list[NodeInfo], delay_s: np.ndarray,
                       bandwidth_Bps: np.ndarray, tflops: dict[str, float] | None, *, dp: int | None,
                       pp: int | None) -> tuple[Cluster, JobShape]:
    """The scheduler's view of ``chosen`` (matrices in the same order) and of the job."""
    delay = _fill(delay_s, DEFAULT_DELAY_S)
    bandwidth = _fill(bandwidth_Bps, DEFAULT_BANDWIDTH_BPS)
    speed = lambda n: (tflops or {}).get(n.id, n.planning_tflops)  # noqa: E731 -- claims checked: swarm.membership
    devices = tuple(
        Device(
            id=n.id,
            tflops=speed(n) if speed(n) > 0 else None,
            memory_bytes=(n.hardware.memory_free_bytes or n.hardware.memory_bytes) or None,
        )
        for n in chosen
    )
    cluster = Cluster(devices=devices, delay_s=delay, bandwidth_Bps=bandwidth, name="swarm")
    rows = spec.micro_batch_size * spec.seq_len  # values per channel of one micro-batch (g=channel scales)
    shape = JobShape(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        seq_len=spec.seq_len,
        num_params=float(config.num_parameters()),
        global_batch_seqs=float(spec.batch_size),
        micro_batch_seqs=float(spec.micro_batch_size),
        # what the stage workers send: float32 when raw, the codec's bits and scales otherwise
        act_bytes_per_value=spec.codec.forward_bytes_per_value(rows=rows),
        act_grad_bytes_per_value=spec.codec.backward_bytes_per_value(rows=rows),
        dp=dp,
        pp=pp,
    )
    return cluster, shape


def predicted_times(plan: Plan, *, spec: JobSpec, config: ModelConfig, nodes: list[NodeInfo], delay_s: np.ndarray,
                    bandwidth_Bps: np.ndarray, tflops: dict[str, float]) -> tuple[float, float]:
    """``plan``'s predicted step time if its nodes ran at ``tflops`` (else at their planning
    speed), as (compute with its 1F1B bubble, communication) seconds. ``nodes``: with the
    matrices, in the same order; must hold the plan's."""
    ids = {str(d) for st in plan.stages for d in st.devices}
    order = [i for i, n in enumerate(nodes) if n.id in ids]
    if len(order) != len(ids):
        raise InfeasiblePlanError("a node of the plan is not online")
    cluster, shape = _cluster_and_shape(spec, config, [nodes[i] for i in order],
                                        np.asarray(delay_s)[np.ix_(order, order)],
                                        np.asarray(bandwidth_Bps)[np.ix_(order, order)], tflops,
                                        dp=plan.d_dp, pp=plan.d_pp)
    scored = evaluate_plan(cluster, shape, plan, objective="predicted_iteration")
    return scored.compute_s, scored.cost_s - scored.compute_s


def grow_plan(plan: Plan, idle: list[NodeInfo], nodes: dict[str, NodeInfo], *, num_replicas: int,
              spec: JobSpec) -> JobPlan:
    """``plan`` with pipelines added on ``idle`` nodes up to ``num_replicas`` (a growth fence).

    Every current worker keeps its node, stage and layers, so a new replica is a copy of a live
    one's state as it is (coordinator/jobs/churn.py :func:`state_sources`); the new pipelines take
    the same layer split. Tie-breaks: the stages with the most layers pick first, each the
    fastest idle node (then by id) with the memory the stage needs (when both are known).
    ``nodes``: every node of ``plan`` and ``idle`` by id. Raises InfeasiblePlanError when the idle
    nodes cannot hold the pipelines or the global batch does not split over them."""
    _check_batch(spec, num_replicas)
    free = sorted(idle, key=lambda n: (-n.planning_tflops, n.id))
    added: dict[int, list[str]] = {s: [] for s in range(len(plan.stages))}
    heavy_first = sorted(range(len(plan.stages)), key=lambda s: (-plan.stages[s].num_layers, s))
    for _ in range(num_replicas - plan.d_dp):
        for s in heavy_first:
            fit = next((n for n in free if _holds(n, plan.stages[s].memory_bytes)), None)
            if fit is None:
                raise InfeasiblePlanError(f"no idle node can hold stage {s} (layers {list(plan.stages[s].layers)}) "
                                          "of a new replica")
            free.remove(fit)
            added[s].append(fit.id)
    stages = tuple(replace(st, devices=tuple(st.devices) + tuple(added[s])) for s, st in enumerate(plan.stages))
    grown = replace(plan, stages=stages)
    return JobPlan(plan=grown, assignments=assignments_from_plan(grown, nodes))


def holds_stage(node: NodeInfo, plan: Plan, stage: int) -> bool:
    """Whether ``node`` has the memory stage ``stage`` of ``plan`` needs (True when unknown)."""
    return _holds(node, plan.stages[stage].memory_bytes)


def _holds(node: NodeInfo, need: int | None) -> bool:
    """Whether ``node`` has the memory a stage ``need``s (True when either is unknown)."""
    has = node.hardware.memory_free_bytes or node.hardware.memory_bytes
    return not need or not has or has >= need


def _node_ids(plan: Plan) -> list[list[str]]:
    """The node ids of each stage of ``plan``, in replica order."""
    return [[str(d) for d in st.devices] for st in plan.stages]


def _same_stage(stages: list[list[str]], apart: set[frozenset[str]]) -> list[tuple[str, str]]:
    """The pairs of ``apart`` that ``stages`` (node ids per stage) put on one stage (sorted ids)."""
    out = []
    for devs in stages:
        ids = sorted(devs)
        out += [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if frozenset((a, b)) in apart]
    return out


def conflicts(plan: Plan, apart: set[frozenset[str]]) -> list[tuple[str, str]]:
    """The pairs of ``apart`` that ``plan`` puts on the same stage (sorted ids)."""
    return _same_stage(_node_ids(plan), apart)


def _apart_score(stages: list[list[str]], apart: set[frozenset[str]]) -> tuple[int, int]:
    """(pairs of ``apart`` on one stage, pairs that are pipeline neighbours: the same replica of
    adjacent stages, where one witnesses the other's results for its checker)."""
    near = sum(frozenset((x, y)) in apart for s in range(len(stages) - 1) for x, y in zip(stages[s], stages[s + 1]))
    return len(_same_stage(stages, apart)), near


def separate(jp: JobPlan, apart: set[frozenset[str]], nodes: dict[str, NodeInfo]) -> JobPlan | None:
    """``jp`` with no pair of ``apart`` on one stage, or None when swaps cannot do it.

    A pair is a checker and the node it accused (coordinator/jobs/spotchecks.py): on one stage
    they check each other; as pipeline neighbours the accuser would witness the accused's results
    for its new checker (and a lying accuser could send that checker wrong copies). So plans are
    scored by (pairs on one stage, pairs that are neighbours), and nodes are swapped (between
    stages, each node with the memory of its new stage, or between replicas of one stage) while
    a swap lowers the score, the best swap first. The score falls with every swap, so the search
    ends. None when pairs remain on one stage; pairs left as neighbours are accepted (too few
    nodes to avoid it). Layer splits stay as planned; only the nodes holding them move.
    ``nodes``: every node of the plan by id."""
    before = _node_ids(jp.plan)
    stages = before
    need = [st.memory_bytes for st in jp.plan.stages]
    score = _apart_score(stages, apart)
    involved = frozenset().union(*apart)
    while score != (0, 0):
        best = None
        for s, t in ((s, t) for s in range(len(stages)) for t in range(s, len(stages))):
            for i, a in enumerate(stages[s]):
                for j, z in enumerate(stages[t]):
                    if (s == t and j <= i) or (a not in involved and z not in involved) or (
                            s != t and not (_holds(nodes[a], need[t]) and _holds(nodes[z], need[s]))):
                        continue  # (a swap of two nodes outside every pair changes no score)
                    cand = [list(devs) for devs in stages]
                    cand[s][i], cand[t][j] = z, a
                    sc = _apart_score(cand, apart)
                    if sc < (best[0] if best else score):
                        best = (sc, cand)
        if best is None:
            break
        score, stages = best
    if score[0]:
        return None
    if stages == before:
        return jp
    plan = replace(jp.plan, stages=tuple(replace(st, devices=tuple(stages[s])) for s, st in enumerate(jp.plan.stages)))
    return JobPlan(plan=plan, assignments=assignments_from_plan(plan, nodes))


def nodes_needed(spec: JobSpec) -> int:
    """The fewest nodes ``spec``'s fixed shape can run on (1 when the planner chooses)."""
    return max(1, spec.num_stages) * max(1, spec.num_replicas)


def shape_flags(spec: JobSpec) -> str:
    """The flags that fixed the job's shape, as the user typed them (for messages)."""
    parts = [f"--stages {spec.num_stages}"] if spec.num_stages else []
    parts += [f"--replicas {spec.num_replicas}"] if spec.num_replicas else []
    return " ".join(parts)


def check_layers(spec: JobSpec, config: ModelConfig) -> None:
    """Raises InvalidRequestError when ``--stages`` asks for more stages than the model has layers."""
    if spec.num_stages > config.num_layers:
        raise InvalidRequestError(
            f"--stages {spec.num_stages} cannot split a model of {config.num_layers} layers (every stage needs "
            f"at least one layer); use --stages {config.num_layers} or fewer"
        )


def check_shape(spec: JobSpec, config: ModelConfig | None, *, num_nodes: int, where: str) -> None:
    """Raise InfeasiblePlanError when ``num_nodes`` nodes (``where``: "idle" or "online") cannot
    hold one pipeline of ``spec``'s fixed shape, naming the flags; InvalidRequestError when
    ``--stages`` exceeds the ``config``'s layers (not checked without a config)."""
    if config is not None:
        check_layers(spec, config)
    if num_nodes == 0:
        raise InfeasiblePlanError(f"no nodes are {where}; start nodes with `swarm-node join`")
    need = nodes_needed(spec)
    if num_nodes < need:
        names = [n for n, v in (("--stages", spec.num_stages), ("--replicas", spec.num_replicas)) if v > 1]
        raise InfeasiblePlanError(
            f"{shape_flags(spec)} needs at least {need} nodes but the swarm has {num_nodes} {where}; start more "
            f"nodes with `swarm-node join` or lower {' or '.join(names)}"
        )


def _check_batch(spec: JobSpec, dp: int) -> None:
    b, mb = spec.batch_size, spec.micro_batch_size
    if b % dp or (b // dp) % mb:
        raise InfeasiblePlanError(
            f"the plan has {dp} replica(s): batch size {b} must split into {dp} share(s) of whole micro-batches "
            f"of {mb}; change --batch-size, --micro-batch-size or the number of nodes"
        )


def assignments_from_plan(plan: Plan, nodes: dict[str, NodeInfo]) -> list[dict[str, Any]]:
    """One dict per (stage, replica): node, layers, neighbours and the stage's replicas."""
    out = []
    num_stages = plan.d_pp
    for s, st in enumerate(plan.stages):
        members = [{"node_id": str(d), "address": nodes[str(d)].peer_address} for d in st.devices]
        for r, dev in enumerate(st.devices):
            prev = plan.stages[s - 1].devices[r] if s > 0 else None
            nxt = plan.stages[s + 1].devices[r] if s + 1 < num_stages else None
            out.append({
                "node_id": str(dev),
                "address": nodes[str(dev)].peer_address,
                "stage": s,
                "replica": r,
                "num_stages": num_stages,
                "num_replicas": plan.d_dp,
                "first_layer": st.layers[0],
                "last_layer_excl": st.layers[1],
                "prev": None if prev is None else {"node_id": str(prev), "address": nodes[str(prev)].peer_address},
                "next": None if nxt is None else {"node_id": str(nxt), "address": nodes[str(nxt)].peer_address},
                "stage_replicas": members,
            })
    return out


def busy_node_ids(running_jobs) -> set[str]:
    return {a["node_id"] for job in running_jobs for a in job.assignments}


