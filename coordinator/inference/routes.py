"""Per-request routes: any replica of stage i may feed any replica of stage i+1.

With ``swarm serve --routes`` the chains a model was placed on are a pool of stage replicas.
Each new session gets the route (one replica per stage, among ready chains with the same
layer ranges) with the lowest predicted time per token, :func:`pick_route`, from a live map:

- step time per node: from the compute each stage reports for a decode step of b sessions
  (``ServeStepReply.stage_compute_s``), fitted as fixed_s + step_s * b over exponentially
  weighted moments (prefill steps are not counted); a node not yet measured counts as the
  mean of the measured candidates of its stage (so it is tried, not avoided);
- queue depth per node: the sessions routed through it, and the routes stepping through it;
- hop latency: the one-way delay of the network matrix (coordinator/network.py), or
  DEFAULT_HOP_S where a hop was not measured.

Predicted time per token of a route = the sum of its nodes' round times, step_s x (sessions + 1)
+ fixed_s x (routes stepping through it, + 1 for a new route), plus its hops' delays: where a
step's cost grows with its sessions, a node twice as slow ends up with half the sessions of
its peers (the split that equalises the round times); where a step's fixed cost dominates,
sessions join routes already stepping rather than open new ones.

A :class:`RouteDriver` (a :class:`Replica` whose stages come from several chains) batches the
sessions of one route; its steps carry the route (``ServeStepRequest.route``: each hop's
replica, node, address and that chain's step capability), and each stage forwards to the
route's next hop (node/inference/routing.py). When a route's step fails, only the stages on
nodes that do not answer are re-routed: the session keeps its other stages and replays the
prefix through the new stage only as far as needed (``replay_stages``); without a live
replica of a lost stage it falls back to a whole replay through the engine's queue, as for a
fixed chain. The chains holding a lost node are failed as usual (the healer repairs them).
Spot checks compare whole chains, so ``--routes`` serves without them (``--verify-prob 0``).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport.inference import step_metadata

from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session

log = logging.getLogger(__name__)

DEFAULT_STEP_S = 1e-3  # a stage no node of which was measured yet: only the queue tells them apart
DEFAULT_HOP_S = 5e-4  # an unmeasured hop (same order as placing.DEFAULT_DELAY_S's LAN hop, one way)
EWMA_ALPHA = 0.2  # weight of a new step time in a node's average


@dataclass(frozen=True, slots=True, kw_only=True)
class Hop:
    """A candidate for one stage of a route: the replica (chain) index and the node holding it."""

    replica: int
    node_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteChoice:
    hops: tuple[Hop, ...]
    predicted_s: float  # predicted time per token of a new session on this route


def node_cost(step_s: float, queue: int, *, fixed_s: float = 0.0, steps: int = 1) -> float:
    """A node's time per round (each of its routes stepped once) with a new session on it:
    ``step_s`` per session for the ``queue`` sessions it serves plus the new one, and ``fixed_s``
    per step for ``steps`` steps (its routes, counting the new session's)."""
    return step_s * (queue + 1) + fixed_s * steps


def pick_route(
    stages: Sequence[Sequence[Hop]],
    *,
    step_s: Mapping[str, float],
    queue: Mapping[str, int],
    capacity: int,
    hop_s: Callable[[str, str], float],
    fixed: Mapping[int, Hop] | None = None,
    fixed_s: Mapping[str, float] | None = None,
    drivers: Mapping[str, int] | None = None,
    active: Sequence[tuple[Hop, ...]] = (),
) -> RouteChoice | None:
    """The route with the lowest predicted time per token, or None when some stage has no
    candidate with room. Predicted time per token = the sum of its nodes' round times
    (:func:`node_cost`) plus its hops' delays: a new route is a shortest path through the
    stages, each of its nodes doing one more step per round; joining an ``active`` route (one
    already stepping) adds only the session.

    ``stages[k]``: the candidates of stage k; ``step_s`` (per session), ``fixed_s`` (per step;
    missing: 0), ``queue`` (sessions), ``drivers`` (active routes through it): per node, every
    candidate with a ``step_s``; ``capacity``: sessions a node's stage holds; ``fixed``: stages
    whose hop is kept (a re-route keeps the stages that still answer: they hold the session's
    cache, so no room is needed there). Ties: an active route first, then the lower
    (replica, node id) sequence, so the choice is deterministic."""
    fixed, fixed_s, drivers = fixed or {}, fixed_s or {}, drivers or {}

    def cost(h: Hop, extra_step: int) -> float:
        n = h.node_id
        return node_cost(step_s[n], queue.get(n, 0), fixed_s=fixed_s.get(n, 0.0), steps=drivers.get(n, 0) + extra_step)

    def room(k: int, h: Hop) -> bool:
        return (fixed.get(k) == h) if k in fixed else queue.get(h.node_id, 0) < capacity

    best: list[tuple[float, tuple[tuple[int, str], ...], tuple[Hop, ...]]] = [(0.0, (), ())]
    for k, cands in enumerate(stages):
        if k in fixed and fixed[k] not in cands:
            return None
        options = [(h, cost(h, 1)) for h in cands if room(k, h)]
        nxt = []
        for h, c_h in options:
            paths = [(c + (hop_s(p[-1].node_id, h.node_id) if p else 0.0) + c_h, key + ((h.replica, h.node_id),), p + (h,))
                     for c, key, p in best]
            nxt.append(min(paths, key=lambda x: (x[0], x[1])))
        if not nxt:
            return None
        best = nxt
    choices = [(c, 1, key, hops) for c, key, hops in best]
    for route in active:
        if len(route) == len(stages) and all(h in stages[k] and room(k, h) for k, h in enumerate(route)):
            c = sum(cost(h, 0) for h in route) + sum(hop_s(a.node_id, b.node_id) for a, b in zip(route, route[1:]))
            choices.append((c, 0, tuple((h.replica, h.node_id) for h in route), tuple(route)))
    c, _, _, hops = min(choices, key=lambda x: (x[0], x[1], x[2]))
    return RouteChoice(hops=hops, predicted_s=c)


def shared_split(splits: Sequence[Sequence[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
    """The layer ranges to load for routes: every chain with as many stages as the first takes
    the first chain's ranges (placement's best chain), so their stages are interchangeable;
    placement may have split them differently for their nodes' speeds (a chain with another
    stage count keeps its own ranges and is routed only among its kind)."""
    if not splits:
        return []
    first = list(splits[0])
    return [list(first) if len(s) == len(first) else list(s) for s in splits]


class LiveMap:
    """Per-node step cost from the compute each stage reports for decode steps of b sessions:
    compute = fixed_s + step_s * b, fitted by least squares on exponentially weighted moments
    (with one batch size seen, fixed_s = 0 and step_s = compute / b)."""

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        self.alpha = alpha
        self._m: dict[str, list[float]] = {}  # node -> E[b], E[t], E[b^2], E[b t]
        self._lock = threading.Lock()

    def observe(self, node_id: str, batch: int, compute_s: float) -> None:
        if not (math.isfinite(compute_s) and 0.0 <= compute_s < 3600.0 and 1 <= batch <= 1 << 16):
            return  # a node's report is data, not trusted: nonsense is ignored
        x = [float(batch), compute_s, float(batch) ** 2, batch * compute_s]
        with self._lock:
            old = self._m.get(node_id)
            self._m[node_id] = x if old is None else [(1 - self.alpha) * o + self.alpha * v for o, v in zip(old, x)]

    def _fit(self, m: list[float]) -> tuple[float, float]:
        b, t, bb, bt = m
        var = bb - b * b
        if var > 0.05:
            per = max(0.0, (bt - b * t) / var)
            fixed = t - per * b
            if fixed >= 0.0:
                return per, fixed
        return t / b, 0.0

    def costs(self, stages: Sequence[Sequence[Hop]]) -> tuple[dict[str, float], dict[str, float]]:
        """(step_s per session, fixed_s per step) of every candidate; unmeasured ones get the
        mean of their stage's measured candidates (DEFAULT_STEP_S and 0 when none was)."""
        with self._lock:
            known = {n: self._fit(m) for n, m in self._m.items()}
        per, fixed = {}, {}
        for cands in stages:
            measured = [known[h.node_id] for h in cands if h.node_id in known]
            prior = ((sum(p for p, _ in measured) / len(measured), sum(f for _, f in measured) / len(measured))
                     if measured else (DEFAULT_STEP_S, 0.0))
            for h in cands:
                per[h.node_id], fixed[h.node_id] = known.get(h.node_id, prior)
        return per, fixed

    def snapshot(self) -> dict[str, tuple[float, float]]:
        """node -> (step_s per session, fixed_s per step)."""
        with self._lock:
            return {n: self._fit(m) for n, m in self._m.items()}


class RouteDriver(Replica):
    """The driver of one route: a Replica whose stage k is stage k of ``chains[k]``."""

    def __init__(self, *, chains: Sequence[Replica], live: LiveMap, security, **kw) -> None:
        stages = [c.stages[k] for k, c in enumerate(chains)]
        super().__init__(model=chains[0].model, index=chains[0].index, stages=stages, security=security, **kw)
        self.chains = tuple(chains)
        self.route = tuple(c.index for c in chains)
        self.capability = chains[0].capability  # the first stage is chain 0's
        self.calls.use_capability(self.capability)
        self._hops = [pb.ServeRouteHop(replica=c.index, node_id=st.node_id, address=st.address, capability=c.capability)
                      for c, st in zip(chains, stages)]
        self._live = live

    def _request(self, entries, closing, commit) -> pb.ServeStepRequest:
        req = super()._request(entries, closing, commit)
        req.route.extend(self._hops)
        return req

    def _observed(self, entries, reply: pb.ServeStepReply, elapsed_s: float) -> None:
        super()._observed(entries, reply, elapsed_s)
        if not entries or any(e.num_tokens != 1 for e in entries):
            return  # a prefill's time per session says little about decoding
        times = list(reply.stage_compute_s)[::-1]  # sent from the last stage back
        if len(times) == len(self.stages):
            for st, t in zip(self.stages, times):
                self._live.observe(st.node_id, len(entries), float(t))

    def _close_idle(self, ids: list[str]) -> None:
        for stub, c in zip(self.calls.stubs, self.chains):
            try:
                stub.CloseSession(pb.ServeCloseSessionRequest(model_name=self.model, replica=c.index, session_ids=ids),
                                  timeout=5, metadata=step_metadata(c.capability))
            except Exception:  # noqa: BLE001 -- an unreachable stage frees its caches by timeout
                pass

    def stop(self, *, unload: bool = False) -> list[Session]:
        return super().stop(unload=False)  # the stages belong to their chains

