"""Inference placement, HexGen-style (DESIGN.md 3.5). Pure: no network, no clock, no globals.

A *replica* is a chain of stages that together hold every layer of the model once. Placement
decides (1) which devices form each replica, (2) the order of each chain and (3) how many
layers each stage holds:

- layer counts are balanced by speed (a stage's time is ``layers * flops_per_layer / speed``)
  and bounded by memory: weights of its layers plus the KV cache of the expected concurrent
  sessions at full context, plus the embedding (first stage) and the LM head (last stage);
- replicas are grown around far-apart seeds so slow links fall *between* replicas, and each
  chain is ordered as the cheapest open path over hop costs (exact by DP for small chains), so
  slow links stay out of a chain wherever the cluster allows;
- the number of stages of a replica is chosen by the objective: ``latency`` (sum of compute and
  hop times per token) or ``throughput`` (tokens/s of the replica: 1 / slowest stage).

Ties are broken by device index so the same input always gives the same plan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from swarm.errors import InfeasiblePlanError, InvalidRequestError

OBJECTIVES = ("latency", "throughput")
# Achieved fraction of peak FLOPS for one-token decode; only the ratio between devices matters
# for balancing, this constant only scales the predicted times that are reported.
DECODE_EFFICIENCY = 0.3
_EXACT_ORDER_MAX = 9  # open-path DP is O(2^n n^2): exact up to 9 stages, greedy beyond


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementDevice:
    """One candidate node. ``memory_bytes`` is what it may use for the model (free memory)."""

    node_id: str
    tflops: float
    memory_bytes: int

    def __post_init__(self) -> None:
        if not self.node_id:
            raise InvalidRequestError("device node_id must be non-empty")
        if not (self.tflops > 0 and math.isfinite(self.tflops)):
            raise InvalidRequestError(f"device {self.node_id}: tflops must be > 0, got {self.tflops}")
        if self.memory_bytes < 0:
            raise InvalidRequestError(f"device {self.node_id}: memory_bytes must be >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """What placement needs to know about a decoder model (bytes in the serving dtype)."""

    num_layers: int
    hidden_size: int
    layer_bytes: int  # weights of one transformer block
    embed_bytes: int  # token (+ position) embeddings, held by the first stage
    head_bytes: int  # final norm + LM head, held by the last stage
    kv_bytes_per_token_per_layer: int  # K and V of one token in one layer
    flops_per_token_per_layer: float
    activation_bytes_per_token: int  # hidden state sent across a stage boundary

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise InvalidRequestError("a model needs at least one layer")
        for name in ("hidden_size", "layer_bytes", "kv_bytes_per_token_per_layer", "activation_bytes_per_token"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"model shape {name} must be > 0")
        if self.embed_bytes < 0 or self.head_bytes < 0 or self.flops_per_token_per_layer <= 0:
            raise InvalidRequestError("model shape embed/head bytes must be >= 0 and flops > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRequest:
    """How to serve: replica count (None: as many as fit), sessions and context per replica."""

    num_replicas: int | None = 1
    sessions_per_replica: int = 8
    max_seq_len: int = 2048
    objective: str = "latency"
    max_stages: int | None = None
    num_stages: int | None = None  # exactly this many stages per replica (benchmarks, tests)

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise InvalidRequestError("--replicas must be >= 1")
        if self.sessions_per_replica < 1 or self.max_seq_len < 1:
            raise InvalidRequestError("sessions_per_replica and max_seq_len must be >= 1")
        if self.objective not in OBJECTIVES:
            raise InvalidRequestError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.max_stages is not None and self.max_stages < 1:
            raise InvalidRequestError("max_stages must be >= 1")
        if self.num_stages is not None and self.num_stages < 1:
            raise InvalidRequestError("--stages must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Links:
    """Pairwise one-way delay (s) and bandwidth (bytes/s), indexed like the device list.

    Missing measurements should be filled by the caller with a pessimistic default.
    """

    delay_s: tuple[tuple[float, ...], ...]
    bandwidth_Bps: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.delay_s)
        if len(self.bandwidth_Bps) != n or any(len(r) != n for r in self.delay_s + self.bandwidth_Bps):
            raise InvalidRequestError("delay and bandwidth matrices must both be n x n")
        for i in range(n):
            for j in range(n):
                if i != j and (self.delay_s[i][j] < 0 or self.bandwidth_Bps[i][j] <= 0):
                    raise InvalidRequestError("delays must be >= 0 and bandwidths > 0")

    @staticmethod
    def uniform(n: int, *, delay_s: float = 1e-4, bandwidth_Bps: float = 1e9) -> Links:
        d = tuple(tuple(0.0 if i == j else delay_s for j in range(n)) for i in range(n))
        b = tuple(tuple(math.inf if i == j else bandwidth_Bps for j in range(n)) for i in range(n))
        return Links(delay_s=d, bandwidth_Bps=b)


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlacement:
    node_id: str
    first_layer: int
    last_layer_excl: int
    compute_s: float  # predicted per-token compute time of this stage

    @property
    def num_layers(self) -> int:
        return self.last_layer_excl - self.first_layer


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaPlacement:
    stages: tuple[StagePlacement, ...]
    latency_s: float  # predicted time per decoded token (compute + hops, incl. the return)
    tokens_per_s: float  # predicted decode throughput with a full pipeline

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    replicas: tuple[ReplicaPlacement, ...]
    objective: str
    unused_node_ids: tuple[str, ...] = field(default=())

    @property
    def latency_s(self) -> float:
        return min(r.latency_s for r in self.replicas)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens_per_s for r in self.replicas)


# ----------------------------------------------------------------------------- layer split
def layer_caps(devices: list[PlacementDevice], shape: ModelShape, request: PlacementRequest) -> list[int]:
    """Most layers each device could hold as a middle stage (first/last extras are separate)."""
    per_layer = shape.layer_bytes + shape.kv_bytes_per_token_per_layer * request.max_seq_len * request.sessions_per_replica
    return [max(0, d.memory_bytes // per_layer) for d in devices]


def _stage_cap(dev: PlacementDevice, shape: ModelShape, request: PlacementRequest, *, first: bool, last: bool) -> int:
    per_layer = shape.layer_bytes + shape.kv_bytes_per_token_per_layer * request.max_seq_len * request.sessions_per_replica
    free = dev.memory_bytes - (shape.embed_bytes if first else 0) - (shape.head_bytes if last else 0)
    return max(0, free // per_layer)


def balance_layers(num_layers: int, speeds: list[float], caps: list[int]) -> list[int] | None:
    """Split ``num_layers`` contiguous layers over stages (in order) minimising the slowest
    stage's time ``layers_i / speed_i``, with ``1 <= layers_i <= caps_i``. None if infeasible.

    Exact: the optimum bottleneck T is one of the values l / speed_i; we take the smallest T
    whose capacities ``min(cap_i, floor(T * speed_i))`` sum to at least num_layers, then hand
    back the surplus from the stages that are slowest after removal (keeps the max at T).
    """
    n = len(speeds)
    if n == 0 or n > num_layers or any(c < 1 for c in caps) or sum(caps) < num_layers:
        return None
    candidates = sorted({l / s for s, c in zip(speeds, caps) for l in range(1, min(c, num_layers) + 1)})

    def alloc(t: float) -> list[int]:
        # 1e-12 guards float error on l / s * s
        return [max(1, min(c, int(math.floor(t * s + 1e-12)))) for s, c in zip(speeds, caps)]

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # smallest candidate T with enough room
        mid = (lo + hi) // 2
        if sum(alloc(candidates[mid])) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    layers = alloc(candidates[lo])
    surplus = sum(layers) - num_layers
    while surplus > 0:
        # take one layer from the currently slowest stage (keeps the bottleneck <= T); ties go
        # to the later stage, since the last stage also runs the LM head.
        i = max((k for k in range(n) if layers[k] > 1), key=lambda k: (layers[k] / speeds[k], k))
        layers[i] -= 1
        surplus -= 1
    return layers


# ----------------------------------------------------------------------------- chain order
def _hop_s(links: Links, i: int, j: int, shape: ModelShape) -> float:
    return links.delay_s[i][j] + shape.activation_bytes_per_token / links.bandwidth_Bps[i][j]


def order_chain(members: list[int], links: Links, shape: ModelShape) -> list[int]:
    """Cheapest open path through ``members`` over hop costs; exact by DP for small chains."""
    n = len(members)
    if n <= 2:
        return sorted(members)
    cost = [[_hop_s(links, a, b, shape) for b in members] for a in members]
    if n <= _EXACT_ORDER_MAX:
        full = (1 << n) - 1
        best: dict[tuple[int, int], tuple[float, int]] = {}
        for k in range(n):
            best[(1 << k, k)] = (0.0, -1)
        for mask in range(1, full + 1):
            for last in range(n):
                cur = best.get((mask, last))
                if cur is None:
                    continue
                for nxt in range(n):
                    if mask & (1 << nxt):
                        continue
                    key = (mask | (1 << nxt), nxt)
                    val = cur[0] + cost[last][nxt]
                    if key not in best or val < best[key][0] - 1e-15:
                        best[key] = (val, last)
        end = min(range(n), key=lambda k: (best[(full, k)][0], k))
        path, mask = [], full
        while end != -1:
            path.append(end)
            prev = best[(mask, end)][1]
            mask &= ~(1 << end)
            end = prev
        path.reverse()
    else:  # nearest neighbour from every start, keep the best
        path, best_cost = [], math.inf
        for start in range(n):
            p, left = [start], set(range(n)) - {start}
            while left:
                nxt = min(left, key=lambda k: (cost[p[-1]][k], k))
                p.append(nxt)
                left.remove(nxt)
            c = sum(cost[a][b] for a, b in zip(p, p[1:]))
            if c < best_cost - 1e-15:
                path, best_cost = p, c
    ordered = [members[k] for k in path]
    # a path and its reverse cost the same on symmetric links: start from the lower index
    if ordered[-1] < ordered[0] and all(
        abs(cost[path[a]][path[a + 1]] - cost[path[a + 1]][path[a]]) < 1e-15 for a in range(n - 1)
    ):
        ordered.reverse()
    return ordered


# ----------------------------------------------------------------------------- one replica
def _stage_time_s(layers: int, dev: PlacementDevice, shape: ModelShape) -> float:
    return layers * shape.flops_per_token_per_layer / (dev.tflops * 1e12 * DECODE_EFFICIENCY)


def plan_chain(
    chain: list[int], devices: list[PlacementDevice], links: Links, shape: ModelShape, request: PlacementRequest
) -> ReplicaPlacement | None:
    """Layer split for an ordered chain of device indices; None if it cannot hold the model."""
    speeds = [devices[i].tflops for i in chain]
    caps = [
        _stage_cap(devices[i], shape, request, first=(k == 0), last=(k == len(chain) - 1)) for k, i in enumerate(chain)
    ]
    layers = balance_layers(shape.num_layers, speeds, caps)
    if layers is None:
        return None
    stages, start = [], 0
    for i, l in zip(chain, layers):
        stages.append(
            StagePlacement(
                node_id=devices[i].node_id,
                first_layer=start,
                last_layer_excl=start + l,
                compute_s=_stage_time_s(l, devices[i], shape),
            )
        )
        start += l
    hops = [_hop_s(links, a, b, shape) for a, b in zip(chain, chain[1:])]
    # the token goes back from the last stage to the first along the same chain (nested calls)
    back = sum(links.delay_s[b][a] for a, b in zip(chain, chain[1:]))
    latency = sum(s.compute_s for s in stages) + sum(hops) + back
    slowest = max([s.compute_s for s in stages] + hops)
    return ReplicaPlacement(stages=tuple(stages), latency_s=latency, tokens_per_s=1.0 / max(slowest, 1e-12))


def _score(r: ReplicaPlacement, objective: str) -> float:
    return r.latency_s if objective == "latency" else -r.tokens_per_s


def best_chain(
    group: list[int], devices: list[PlacementDevice], links: Links, shape: ModelShape, request: PlacementRequest
) -> ReplicaPlacement | None:
    """Best replica from a subset of ``group``: tries every stage count k, using the k fastest
    devices that can hold the model (memory permitting), ordered as the cheapest path."""
    by_speed = sorted(group, key=lambda i: (-devices[i].tflops, -devices[i].memory_bytes, i))
    max_k = min(len(group), shape.num_layers, request.max_stages or len(group))
    ks = range(1, max_k + 1) if request.num_stages is None else [request.num_stages]
    best: ReplicaPlacement | None = None
    for k in ks:
        if k > len(group) or k > shape.num_layers:
            continue
        # with a few devices try every k-subset; beyond that, the k fastest
        subsets = itertools.combinations(sorted(group), k) if len(group) <= 6 else [tuple(by_speed[:k])]
        for subset in subsets:
            plan = plan_chain(order_chain(list(subset), links, shape), devices, links, shape, request)
            if plan is not None and (best is None or _score(plan, request.objective) < _score(best, request.objective) - 1e-12):
                best = plan
    return best


# ----------------------------------------------------------------------------- replicas
def _group_devices(devices: list[PlacementDevice], links: Links, shape: ModelShape, num_groups: int,
                   min_size: int = 1) -> list[list[int]]:
    """Split devices into groups with cheap internal links and similar total speed.

    Seeds are chosen far apart (max-min hop cost, starting from the fastest device); every other
    device, fastest first, joins the group it has the cheapest link to, preferring groups that
    cannot yet hold the model (by memory, or by member count when every chain needs ``min_size``
    stages) and then groups with less total speed.
    """
    n = len(devices)
    order = sorted(range(n), key=lambda i: (-devices[i].tflops, i))
    seeds = [order[0]]
    while len(seeds) < num_groups:
        nxt = max(
            (i for i in order if i not in seeds),
            key=lambda i: (min(_hop_s(links, s, i, shape) for s in seeds), devices[i].tflops, -i),
        )
        seeds.append(nxt)
    groups = [[s] for s in seeds]
    need = shape.num_layers * shape.layer_bytes + shape.embed_bytes + shape.head_bytes
    for i in order:
        if i in seeds:
            continue

        def key(g: int) -> tuple:
            mem = sum(devices[m].memory_bytes for m in groups[g])
            link = min(_hop_s(links, m, i, shape) for m in groups[g])
            speed = sum(devices[m].tflops for m in groups[g])
            # a group short of min_size members cannot form its chain yet: it comes first, even
            # over a cheaper link (spare nodes beyond stages x replicas must not starve a group)
            return (mem >= need and len(groups[g]) >= min_size, round(link, 9), speed, g)

        groups[min(range(num_groups), key=key)].append(i)
    return groups


def place(
    devices: list[PlacementDevice], links: Links, shape: ModelShape, request: PlacementRequest
) -> Placement:
    """Choose replicas, their chain order and layer ranges. Raises InfeasiblePlanError."""
    if not devices:
        raise InfeasiblePlanError("no nodes are available to serve the model; start nodes with `swarm-node join`")
    if len(links.delay_s) != len(devices):
        raise InvalidRequestError("the link matrices must have one row per device")
    if len({d.node_id for d in devices}) != len(devices):
        raise InvalidRequestError("device node_ids must be unique")
    want = request.num_replicas
    counts = [want] if want is not None else list(range(len(devices), 0, -1))
    for r in counts:
        if r > len(devices):
            break
        groups = _group_devices(devices, links, shape, r, request.num_stages or 1)
        replicas = [best_chain(g, devices, links, shape, request) for g in groups]
        if all(p is not None for p in replicas):
            used = {nid for p in replicas for nid in p.node_ids}
            ordered = sorted(replicas, key=lambda p: (_score(p, request.objective), p.node_ids))
            return Placement(
                replicas=tuple(ordered),
                objective=request.objective,
                unused_node_ids=tuple(d.node_id for d in devices if d.node_id not in used),
            )
    total = sum(d.memory_bytes for d in devices)
    need = shape.num_layers * shape.layer_bytes + shape.embed_bytes + shape.head_bytes
    raise InfeasiblePlanError(
        f"cannot place {want or 1} replica(s) of a {shape.num_layers}-layer model on {len(devices)} node(s) "
        f"with {total / 2**30:.2f} GiB free in total (one replica needs {need / 2**30:.2f} GiB of weights plus "
        f"KV cache for {request.sessions_per_replica} session(s) x {request.max_seq_len} tokens); "
        "lower --replicas, the expected sessions or the context length, or add nodes"
    )
