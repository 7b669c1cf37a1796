"""Disaggregated prefill and decode (HexGen-2 style): which nodes prefill, which decode, and
whether that beats colocated serving on the same nodes. Pure: no network, no clock.

The served nodes are cut into chains of ``num_stages`` nodes. Colocated, every chain runs both
phases (a new session's prefill rides in the step of the decoding sessions). Disaggregated,
``p`` chains prefill (the compute-rich nodes: highest TFLOPS, as HexGen-2 gives prefill the
compute) and the rest decode; after its prefill a session's KV cache moves, stage by stage, from
the prefill chain's stage k to the decode chain's stage k. Each decode chain's stage k is the
decode node with the fastest link from prefill stage k (the assignment maximises the slowest
KV link, then the sum: :func:`pair_stages`).

Cost model (per request: P prompt tokens, R generated tokens, B sessions decoding at once;
l = layers per stage, F = FLOPs per token per layer; nodes of a chain work one after another):
- prefill of a chain: Tp = sum_k P F l / flops_k + hop delays (compute-bound);
- a decode step of b sessions: Td(b) = sum_k l (layer_bytes / mem_bw_k + b F / flops_k) + hop
  delays (weights read once per step: memory-bound at small b). ``mem_bw``: what the node measured
  at probe time (swarm/hardware.py, as the coordinator believes it); unmeasured (older nodes):
  assumed DEFAULT_BYTES_PER_FLOP x flops (so the two phases scale alike and only link and
  interference effects remain: auto then never predicts a decode advantage);
- KV move of a session: Tkv = max_k P kv_bytes_per_token_per_layer l / bandwidth(k -> k') + delay.
  Moves overlap (coordinator/inference/disagg.py pushes each detached session on its own thread,
  and a prefill step detaches up to B sessions at once), so a link's delay costs a session its
  time to first token, not the chain its throughput: the KV links carry
  min(1 / max_k(bytes_k / bandwidth_k), B / Tkv) sessions/s.
Throughput (requests/s): colocated sum_c 1 / (Tp(c) + R Td(c, B) / B); disaggregated
min(sum_prefill 1 / Tp(c), sum_decode B / (R Td(c, B)), KV links' rate summed over prefill chains).
Time between tokens, p99: colocated a step that carries a new session's prefill, Td + Tp;
disaggregated Td of the decode chain. ``predicted_gain`` = throughput ratio (disaggregated /
colocated).

Decision (:func:`decide_disaggregation`, ``swarm serve --disaggregate {auto,on,off}``): ``on``
always disaggregates (too few nodes is an error), ``off`` never does; ``auto`` (the default) only
when the serve options allow it (:func:`auto_blocker`: no ``--routes``, 2+ chains; spot checks
work disaggregated: coordinator/inference/checks.py), the nodes make 2+ chains, and the predicted
gain is at least AUTO_MIN_GAIN. Otherwise it serves colocated and the reason says why.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from swarm.errors import InvalidRequestError
from swarm.scheduling.placement import Links, ModelShape, PlacementDevice

DEFAULT_BYTES_PER_FLOP = 0.1  # memory bytes/s per FLOP/s when unmeasured: a CPU's ratio (~50 GB/s per 0.5 TFLOPS)
# automatic disaggregation needs a predicted throughput gain of 15% or more: bench/serving.py found
# the prediction within ~10% of the measured ratio (0.81x measured, 0.8-0.9x predicted), so a 15%
# margin keeps `auto` from turning on a loss it cannot see
AUTO_MIN_GAIN = 1.15
MODES = ("auto", "on", "off")  # swarm serve --disaggregate MODE
ALIKE_RATIO = 1.25  # measured speeds within 25% of each other: the same hardware, up to measurement noise
EXACT_PAIRING_MAX_STAGES = 6  # 6! = 720 permutations; greedy beyond


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The request mix the prediction assumes: mean prompt and response tokens, sessions decoding at once."""

    prompt_tokens: int = 512
    response_tokens: int = 32
    batch_sessions: int = 8

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.response_tokens < 1 or self.batch_sessions < 1:
            raise InvalidRequestError("workload prompt_tokens, response_tokens and batch_sessions must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggPlan:
    """``prefill_chains`` / ``decode_chains``: node ids per stage; decode chain i takes its KV from
    prefill chain i % len(prefill_chains), stage k from stage k."""

    enabled: bool
    prefill_chains: tuple[tuple[str, ...], ...]
    decode_chains: tuple[tuple[str, ...], ...]
    predicted_gain: float  # throughput, disaggregated / colocated on the same nodes
    predicted_tbt_p99_ratio: float  # p99 time between tokens, disaggregated / colocated
    reason: str

    @property
    def prefill_nodes(self) -> tuple[str, ...]:
        return tuple(n for c in self.prefill_chains for n in c)

    @property
    def decode_nodes(self) -> tuple[str, ...]:
        return tuple(n for c in self.decode_chains for n in c)


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggDecision:
    """Whether a model is served disaggregated, and why (the ``reason`` of ``swarm models``)."""

    mode: str  # one of MODES
    enabled: bool
    reason: str


def auto_blocker(*, routes: bool, num_replicas: int | None) -> str:
    """Why the serve options rule out automatic disaggregation ("" when they allow it);
    ``num_replicas`` None: as many as fit. Spot checks (``--verify-prob``) do not: their replays
    ride on the prefill chains (coordinator/inference/checks.py)."""
    if routes:
        return "--routes is on (a session's KV cannot move between routed stages)"
    if num_replicas is not None and num_replicas < 2:
        return f"--replicas {num_replicas} leaves no decode chain; pass --replicas 2 or more, or 0"
    return ""


def decide_disaggregation(mode: str, *, blocker: str = "", predicted_gain: float | None, prediction: str = "",
                          min_gain: float = AUTO_MIN_GAIN) -> DisaggDecision:
    """The decision for ``mode`` given :func:`auto_blocker`'s ``blocker``, the predicted throughput
    gain (None: the nodes make fewer than 2 chains) and the prediction's explanation (appended to
    the reason)."""
    if mode not in MODES:
        raise InvalidRequestError(f"--disaggregate must be one of {', '.join(MODES)}, got {mode!r}")
    tail = f"; {prediction}" if prediction else ""
    if mode == "on":
        if predicted_gain is not None and predicted_gain < min_gain:
            return DisaggDecision(mode=mode, enabled=True, reason=f"served disaggregated because --disaggregate on "
                                  f"asked for it (predicted gain {predicted_gain:.2f}x){tail}")
        return DisaggDecision(mode=mode, enabled=True, reason=f"--disaggregate on{tail}")
    if mode == "off":
        return DisaggDecision(mode=mode, enabled=False, reason=f"not disaggregated: --disaggregate off{tail}")
    if blocker:
        return DisaggDecision(mode=mode, enabled=False, reason=f"auto: not disaggregated: {blocker}{tail}")
    if predicted_gain is None:
        return DisaggDecision(mode=mode, enabled=False, reason=f"auto: not disaggregated{tail}")
    if predicted_gain < min_gain:
        return DisaggDecision(mode=mode, enabled=False, reason=f"auto: not disaggregated: predicted gain "
                              f"{predicted_gain:.2f}x is under {min_gain:g}x (--disaggregate on forces it){tail}")
    return DisaggDecision(mode=mode, enabled=True,
                          reason=f"auto: disaggregated: predicted gain {predicted_gain:.2f}x >= {min_gain:g}x{tail}")


def pool_alike(devices: Sequence[PlacementDevice], mem_bandwidth_Bps: Mapping[str, float],
               device_models: Mapping[str, str]) -> tuple[list[PlacementDevice], dict[str, float]]:
    """The figures the prediction uses: nodes of the same device model (``device_models``: node id
    -> e.g. "cuda:NVIDIA H100 80GB HBM3"; nodes without one are left alone) are the same
    hardware, and their measured TFLOPS and memory bandwidth differ only by measurement noise (on
    a loaded 2-core box two node processes of one CPU measured 0.003 and 0.014 TFLOPS), which
    must not make `auto` see a prefill/decode split where there is none. Each model's nodes get
    its median figures (bandwidth: over those that measured it). Order of ``devices`` kept."""
    groups: dict[str, list[str]] = {}
    for d in devices:
        if device_models.get(d.node_id):
            groups.setdefault(device_models[d.node_id], []).append(d.node_id)
    speed = {d.node_id: d.tflops for d in devices}
    tflops, bw = {}, dict(mem_bandwidth_Bps)
    for ids in groups.values():
        t = statistics.median(speed[i] for i in ids)
        measured = [mem_bandwidth_Bps[i] for i in ids if mem_bandwidth_Bps.get(i)]
        for i in ids:
            tflops[i] = t
            if measured:
                bw[i] = statistics.median(measured)
    return [replace(d, tflops=tflops.get(d.node_id, d.tflops)) for d in devices], bw


def pair_stages(prefill_chain: Sequence[str], decode_nodes: Sequence[str],
                bandwidth: Callable[[str, str], float]) -> tuple[str, ...]:
    """The decode node for each prefill stage (as many as stages, from ``decode_nodes``): the
    assignment whose slowest KV link (prefill stage k -> its decode node) is fastest, then the
    largest summed bandwidth; ties: the lower node-id sequence. Exact up to
    EXACT_PAIRING_MAX_STAGES stages, greedy (fastest remaining link first) beyond."""
    k = len(prefill_chain)
    if len(decode_nodes) < k:
        raise InvalidRequestError(f"{k} prefill stages need {k} decode nodes, got {len(decode_nodes)}")
    cands = sorted(decode_nodes)
    if k <= EXACT_PAIRING_MAX_STAGES and len(cands) <= EXACT_PAIRING_MAX_STAGES + 2:
        def key(perm):
            bws = [bandwidth(a, b) for a, b in zip(prefill_chain, perm)]
            return (-min(bws), -sum(bws), perm)
        return tuple(min(itertools.permutations(cands, k), key=key))
    out: list[str | None] = [None] * k
    left = set(cands)
    pairs = sorted(((-bandwidth(a, b), i, b) for i, a in enumerate(prefill_chain) for b in cands))
    for _, i, b in pairs:
        if out[i] is None and b in left:
            out[i] = b
            left.discard(b)
    return tuple(out)  # type: ignore[arg-type]


def plan_disaggregation(devices: Sequence[PlacementDevice], links: Links, shape: ModelShape, *, num_stages: int,
                        workload: Workload = Workload(), mode: str = "auto", blocker: str = "",
                        mem_bandwidth_Bps: Mapping[str, float] | None = None) -> DisaggPlan:
    """Split ``devices`` (indexed like ``links``) into prefill and decode chains of
    ``num_stages`` nodes and predict the gain over colocated chains on the same nodes.
    ``enabled`` and the end of ``reason``: :func:`decide_disaggregation` for ``mode`` and
    ``blocker``. Raises InvalidRequestError when fewer than two chains fit and ``mode`` is on."""
    K = num_stages
    if K < 1:
        raise InvalidRequestError("num_stages must be >= 1")
    C = len(devices) // K
    if C < 2:
        if mode == "on":
            raise InvalidRequestError(
                f"--disaggregate needs a prefill and a decode chain: 2 x {K} stage(s) = {2 * K} nodes, "
                f"{len(devices)} are available; start more nodes or lower --stages")
        d = decide_disaggregation(mode, blocker=blocker, predicted_gain=None,
                                  prediction=f"{len(devices)} node(s) make fewer than 2 chains of {K}")
        return DisaggPlan(enabled=d.enabled, prefill_chains=(), decode_chains=(), predicted_gain=1.0,
                          predicted_tbt_p99_ratio=1.0, reason=d.reason)
    index = {d.node_id: i for i, d in enumerate(devices)}
    speed = {d.node_id: d.tflops * 1e12 for d in devices}
    for node_id, v in (mem_bandwidth_Bps or {}).items():
        if not (math.isfinite(v) and v > 0):
            raise InvalidRequestError(f"memory bandwidth of {node_id} must be finite and > 0 bytes/s, got {v!r}")
    mem_bw = {d.node_id: (mem_bandwidth_Bps or {}).get(d.node_id) or d.tflops * 1e12 * DEFAULT_BYTES_PER_FLOP
              for d in devices}
    l = shape.num_layers / K  # layers per stage (the prediction's even split)
    F, P, R, B = shape.flops_per_token_per_layer, workload.prompt_tokens, workload.response_tokens, workload.batch_sessions

    def delay(a: str, b: str) -> float:
        return links.delay_s[index[a]][index[b]]

    def bw(a: str, b: str) -> float:
        return math.inf if a == b else links.bandwidth_Bps[index[a]][index[b]]

    def hops(c: Sequence[str]) -> float:
        return sum(delay(a, b) for a, b in zip(c, c[1:]))

    def t_prefill(c: Sequence[str]) -> float:
        return sum(P * F * l / speed[n] for n in c) + hops(c)

    def t_decode(c: Sequence[str], b: int) -> float:
        return sum(l * (shape.layer_bytes / mem_bw[n] + b * F / speed[n]) for n in c) + hops(c)

    def kv_rate(src: Sequence[str], dst: Sequence[str]) -> float:
        """Sessions/s the KV links from ``src`` to ``dst`` carry: bandwidth-bound, with up to B moves in flight."""
        nbytes = P * shape.kv_bytes_per_token_per_layer * l
        wire = max(nbytes / bw(a, b) for a, b in zip(src, dst))
        latency = max(nbytes / bw(a, b) + (delay(a, b) if a != b else 0.0) for a, b in zip(src, dst))
        return min(1.0 / wire if wire > 0 else math.inf, B / latency if latency > 0 else math.inf)

    ranked = [d.node_id for d in sorted(devices, key=lambda d: (-d.tflops, d.node_id))][:C * K]  # compute-rich first
    chains = [tuple(ranked[i * K:(i + 1) * K]) for i in range(C)]
    coloc_thr = sum(1.0 / (t_prefill(c) + R * t_decode(c, B) / B) for c in chains)
    coloc_tbt = max(t_decode(c, B) + t_prefill(c) for c in chains)
    best = None
    for p in range(1, C):
        pre = chains[:p]
        rest = list(ranked[p * K:])
        dec = []
        for i in range(C - p):
            d = pair_stages(pre[i % p], rest, bw)
            rest = [n for n in rest if n not in d]
            dec.append(d)
        thr = min(sum(1.0 / t_prefill(c) for c in pre),
                  sum(B / (R * t_decode(c, B)) for c in dec),
                  sum(kv_rate(pre[i % p], d) for i, d in enumerate(dec[:p])) if dec else 0.0)
        tbt = max(t_decode(c, B) for c in dec)
        if best is None or thr > best[0] * (1 + 1e-9):  # ties: fewer prefill chains (decode is the bulk)
            best = (thr, tbt, tuple(pre), tuple(dec))
    thr, tbt, pre, dec = best
    gain, tbt_ratio = thr / coloc_thr, tbt / coloc_tbt
    slow = min(speed[n] for c in pre for n in c) / 1e12
    used = [speed[n] for c in pre + dec for n in c]
    alike = max(used) <= min(used) * ALIKE_RATIO
    mix = f"{P}-token prompts, {R}-token responses, {B} sessions"
    if gain >= 1.0:
        reason = (f"predicted {gain:.2f}x throughput over colocated chains ({mix}): prefill on the "
                  f"{len(pre) * K} compute-richest node(s) (>= {slow:.3g} TFLOPS), decode on {len(dec) * K}")
    else:
        why = ("the nodes are alike, so colocated chains already keep every node busy with both phases"
               if alike else f"with nodes of {min(used) / 1e12:.3g}-{max(used) / 1e12:.3g} TFLOPS, the decode "
               "chains' steps do not gain enough to pay for the prefill nodes idling between prompts")
        reason = f"predicted no throughput gain ({gain:.2f}x colocated, {mix}): {why}"
    reason += f"; p99 time between tokens predicted {tbt_ratio:.2f}x (decode steps never wait for a prefill)"
    unmeasured = sorted(n for c in pre + dec for n in c if not (mem_bandwidth_Bps or {}).get(n))
    if unmeasured:  # the usual reason auto stays off on swarms of older nodes: say it
        reason += (f"; memory bandwidth not measured on {len(unmeasured)} of {len(used)} node(s) (older nodes), "
                   f"assumed {DEFAULT_BYTES_PER_FLOP:g} byte per FLOP/s")
    d = decide_disaggregation(mode, blocker=blocker, predicted_gain=gain, prediction=reason)
    return DisaggPlan(enabled=d.enabled, prefill_chains=pre, decode_chains=dec, predicted_gain=gain,
                      predicted_tbt_p99_ratio=tbt_ratio, reason=d.reason)


def decode_step_bytes(shape: ModelShape, *, num_layers: int, context_tokens: Sequence[int],
                      last_stage: bool = False) -> float:
    """Bytes a decode step of a stage of ``num_layers`` layers must read from memory: its weights
    once (the LM head's too on the last stage) and, per session, the K and V of every position it
    attends to (``context_tokens``: one count per session, the new token included)."""
    weights = num_layers * shape.layer_bytes + (shape.head_bytes if last_stage else 0)
    return float(weights + num_layers * shape.kv_bytes_per_token_per_layer * sum(context_tokens))


def seen_stage_bandwidths(shape: ModelShape, *, stages: Sequence[tuple[int, int]], context_tokens: Sequence[int],
                          compute_s: Sequence[float]) -> list[float | None]:
    """The memory bandwidth each stage of a decode step showed, bytes/s: :func:`decode_step_bytes`
    of its layers (``stages``: (first, last exclusive) layer) over its compute time; a LOWER bound
    of its real bandwidth (the step read at least that much in that time). None for a stage whose
    time is not a positive finite number (a report is data, not trusted)."""
    out: list[float | None] = []
    for (first, last), t in zip(stages, compute_s):
        ok = isinstance(t, (int, float)) and math.isfinite(t) and t > 0 and last > first
        out.append(decode_step_bytes(shape, num_layers=last - first, context_tokens=context_tokens,
                                     last_stage=last >= shape.num_layers) / t if ok else None)
    return out
