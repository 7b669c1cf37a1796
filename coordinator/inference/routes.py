"""Per-request routes: any replica of stage i may feed any replica of stage i+1.

With ``swarm serve --routes`` the chains a model was placed on are a pool of stage replicas.
Each new session gets the route (one replica per stage, among ready chains with the same
layer ranges) with the lowest predicted time per token, :func:`pick_route`, from a live map:

- step time per node: an exponential average of the compute time each stage reports for a
  decode step (``ServeStepReply.stage_compute_s``), per session of the step (prefill steps are
  not counted); a node not yet measured counts as the mean of the measured candidates of its
  stage (so it is tried, not avoided);
- queue depth per node: the sessions routed through it;
- hop latency: the one-way delay of the network matrix (coordinator/network.py), or
  DEFAULT_HOP_S where a hop was not measured.

Predicted time per token of a route = sum over its stages of step_s x (queue + 1) + its hops'
delays: a node is modelled as taking its sessions one after another, so a node twice as slow
ends up with half the sessions of its peers (the split that equalises the per-node cost).

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

from coordinator.inference.replica import Replica, Session

log = logging.getLogger(__name__)

DEFAULT_STEP_S = 1e-3  # a stage no node of which was measured yet: only the queue tells them apart
DEFAULT_HOP_S = 5e-4  # an unmeasured hop (same order as engine.DEFAULT_DELAY_S's LAN hop, one way)
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


def node_cost(step_s: float, queue: int) -> float:
    """Predicted time a node adds to each token of a new session: its step time for each of the
    sessions it already serves, plus the new one."""
    return step_s * (queue + 1)


def pick_route(
    stages: Sequence[Sequence[Hop]],
    *,
    step_s: Mapping[str, float],
    queue: Mapping[str, int],
    capacity: int,
    hop_s: Callable[[str, str], float],
    fixed: Mapping[int, Hop] | None = None,
) -> RouteChoice | None:
    """The route with the lowest predicted time per token (a shortest path through the stages:
    node costs plus hop delays), or None when some stage has no candidate with room.

    ``stages[k]``: the candidates of stage k; ``step_s`` / ``queue``: per node (every candidate
    must have a step time; a missing queue is 0); ``capacity``: sessions a node's stage holds;
    ``fixed``: stages whose hop is kept (a re-route keeps the stages that still answer: they
    hold the session's cache, so no room is needed there). Ties: the lower
    (replica, node id) sequence wins, so the choice is deterministic."""
    fixed = fixed or {}
    best: list[tuple[float, tuple[tuple[int, str], ...], tuple[Hop, ...]]] = [(0.0, (), ())]
    for k, cands in enumerate(stages):
        if k in fixed:
            if fixed[k] not in cands:
                return None
            options = [(fixed[k], node_cost(step_s[fixed[k].node_id], queue.get(fixed[k].node_id, 0)))]
        else:
            options = [(h, node_cost(step_s[h.node_id], queue.get(h.node_id, 0)))
                       for h in cands if queue.get(h.node_id, 0) < capacity]
        nxt = []
        for h, cost in options:
            paths = [(c + (hop_s(p[-1].node_id, h.node_id) if p else 0.0) + cost, key + ((h.replica, h.node_id),), p + (h,))
                     for c, key, p in best]
            nxt.append(min(paths, key=lambda x: (x[0], x[1])))
        if not nxt:
            return None
        best = nxt
    c, _, hops = min(best, key=lambda x: (x[0], x[1]))
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
    """Per-node step time per session (exponential average of the stages' reported compute)."""

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        self.alpha = alpha
        self._step_s: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, node_id: str, step_s: float) -> None:
        if not (math.isfinite(step_s) and 0.0 <= step_s < 3600.0):
            return  # a node's report is data, not trusted: nonsense is ignored
        with self._lock:
            old = self._step_s.get(node_id)
            self._step_s[node_id] = step_s if old is None else (1 - self.alpha) * old + self.alpha * step_s

    def step_s(self, stages: Sequence[Sequence[Hop]]) -> dict[str, float]:
        """Step time of every candidate; unmeasured ones get the mean of their stage's measured
        candidates (DEFAULT_STEP_S when none was measured)."""
        with self._lock:
            known = dict(self._step_s)
        out = {}
        for cands in stages:
            measured = [known[h.node_id] for h in cands if h.node_id in known]
            prior = sum(measured) / len(measured) if measured else DEFAULT_STEP_S
            for h in cands:
                out[h.node_id] = known.get(h.node_id, prior)
        return out

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._step_s)


class RouteDriver(Replica):
    """The driver of one route: a Replica whose stage k is stage k of ``chains[k]``."""

    def __init__(self, *, chains: Sequence[Replica], live: LiveMap, security, **kw) -> None:
        stages = [c.stages[k] for k, c in enumerate(chains)]
        super().__init__(model=chains[0].model, index=chains[0].index, stages=stages, security=security, **kw)
        self.chains = tuple(chains)
        self.route = tuple(c.index for c in chains)
        self.capability = chains[0].capability  # the first stage is chain 0's
        self._metadata = step_metadata(self.capability)
        self._hops = [pb.ServeRouteHop(replica=c.index, node_id=st.node_id, address=st.address, capability=c.capability)
                      for c, st in zip(chains, stages)]
        self._live = live

    def _request(self, entries, closing, commit) -> pb.ServeStepRequest:
        req = super()._request(entries, closing, commit)
        req.route.extend(self._hops)
        return req

    def _observed(self, entries, reply: pb.ServeStepReply, elapsed_s: float) -> None:
        if not entries or any(e.num_tokens != 1 for e in entries):
            return  # a prefill's time per session says little about decoding
        times = list(reply.stage_compute_s)[::-1]  # sent from the last stage back
        if len(times) == len(self.stages):
            for st, t in zip(self.stages, times):
                self._live.observe(st.node_id, float(t) / len(entries))

    def _close_idle(self, ids: list[str]) -> None:
        for stub, c in zip(self._stubs, self.chains):
            try:
                stub.CloseSession(pb.ServeCloseSessionRequest(model_name=self.model, replica=c.index, session_ids=ids),
                                  timeout=5, metadata=step_metadata(c.capability))
            except Exception:  # noqa: BLE001 -- an unreachable stage frees its caches by timeout
                pass

    def stop(self, *, unload: bool = False) -> list[Session]:
        return super().stop(unload=False)  # the stages belong to their chains

