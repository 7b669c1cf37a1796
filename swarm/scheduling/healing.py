"""Self-healing of served models: which chains to retire, repair, add or drop. Pure: no network,
no clock, no globals.

The coordinator keeps every served model at its requested replica count while volunteers come
and go. Each tick it takes a snapshot (the models' needs, the usable nodes, every chain of every
model) and calls :func:`heal`; a thin loop carries the actions out. The function is idempotent:
a chain being loaded counts toward its model's replicas, so calling it again before an action
finished asks for nothing new.

Rules, per model (models in name order, so two models competing for one spare always resolve
the same way):

- a ``ready`` chain with a stage on a node that is no longer online is retired (its sessions
  fail over; next tick it is ``broken``);
- while ``healthy + loading < requested``, ``broken`` chains are repaired first, fewest lost
  stages first (their surviving stages keep their layers: only the lost stages are fetched),
  then whole new chains are added with the model's layer layout;
- a lost stage goes to a *spare*: a usable node (online, not backing off after a failure) that
  holds no stage of this model and has the memory for the stage. Among spares the fastest
  wins (a chain runs at its slowest stage), then the one with the most free memory, then the
  lowest id (determinism). A node is given at most one new stage per call, so a node that
  comes back after a failure is used once, never twice;
- when no spare fits, the model gets a :class:`Wait` naming what is missing and the loop backs
  off; broken chains beyond the requested count are dropped (their survivors unloaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.errors import InvalidRequestError

CHAIN_STATES = ("ready", "loading", "broken")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealNode:
    """An online node. ``memory_free_bytes``: what it has left for new stages (after the stages
    it already holds). ``usable``: False while it backs off after a failed step or load."""

    node_id: str
    tflops: float
    memory_free_bytes: int
    usable: bool = True

    def __post_init__(self) -> None:
        if not self.node_id:
            raise InvalidRequestError("heal node_id must be non-empty")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainStage:
    node_id: str
    first_layer: int
    last_layer_excl: int

    def __post_init__(self) -> None:
        if not 0 <= self.first_layer < self.last_layer_excl:
            raise InvalidRequestError(f"chain stage layers [{self.first_layer}, {self.last_layer_excl}) are invalid")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chain:
    """One replica of a model. ``lost_node_ids``: nodes of a ``broken`` chain known to have lost
    their stage (unreachable when the chain failed); such a node holds nothing of the chain
    even if it is online again."""

    model: str
    replica: int
    state: str
    stages: tuple[ChainStage, ...]
    lost_node_ids: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.state not in CHAIN_STATES:
            raise InvalidRequestError(f"chain state must be one of {CHAIN_STATES}, got {self.state!r}")
        if not self.stages:
            raise InvalidRequestError("a chain has at least one stage")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelNeeds:
    """What a served model asks for. ``layout``: layer ranges of a new chain, stage order.
    ``layer_bytes``: one layer's weights + KV cache at full sessions and context;
    ``embed_bytes``/``head_bytes``: extra on the first/last stage. ``backoff``: a heal action of
    this model failed recently, leave it alone for now (retiring still happens)."""

    name: str
    requested: int
    layout: tuple[tuple[int, int], ...]
    layer_bytes: int
    embed_bytes: int = 0
    head_bytes: int = 0
    backoff: bool = False

    def __post_init__(self) -> None:
        if self.requested < 0:
            raise InvalidRequestError("requested replicas must be >= 0")
        if not self.layout or self.layer_bytes < 0:
            raise InvalidRequestError("a model needs a non-empty layout and layer_bytes >= 0")

    def stage_bytes(self, first_layer: int, last_layer_excl: int, *, first: bool, last: bool) -> int:
        return ((last_layer_excl - first_layer) * self.layer_bytes + (self.embed_bytes if first else 0)
                + (self.head_bytes if last else 0))


@dataclass(frozen=True, slots=True, kw_only=True)
class RetireChain:
    model: str
    replica: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairChain:
    """Load the chain again with each ``(stage index, node id)`` of ``replacements`` moved to
    that node; the other stages keep their nodes (and layers)."""

    model: str
    replica: int
    replacements: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class AddChain:
    model: str
    stages: tuple[ChainStage, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DropChain:
    model: str
    replica: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    model: str
    reason: str


HealAction = RetireChain | RepairChain | AddChain | DropChain | Wait


def heal(models: tuple[ModelNeeds, ...] | list[ModelNeeds], nodes: tuple[HealNode, ...] | list[HealNode],
         placements: tuple[Chain, ...] | list[Chain]) -> list[HealAction]:
    """The actions that bring every model back to its requested replica count (see the module
    docstring for the rules). ``nodes``: the online nodes; ``placements``: every chain."""
    online = {n.node_id: n for n in nodes}
    free = {n.node_id: n.memory_free_bytes for n in nodes}
    taken: set[str] = set()  # nodes given a stage in this call
    actions: list[HealAction] = []
    for model in sorted(models, key=lambda m: m.name):
        chains = sorted((c for c in placements if c.model == model.name), key=lambda c: c.replica)
        # nodes holding (or loading) a stage of this model: never a spare for it
        holding = {s.node_id for c in chains for s in c.stages
                   if c.state != "broken" or (s.node_id not in c.lost_node_ids)}
        healthy = 0
        for c in chains:
            if c.state != "ready":
                continue
            gone = [s.node_id for s in c.stages if s.node_id not in online]
            if gone:
                actions.append(RetireChain(model=model.name, replica=c.replica,
                                           reason=f"node {gone[0][:12]} is offline"))
            else:
                healthy += 1
        loading = sum(c.state == "loading" for c in chains)
        deficit = model.requested - healthy - loading
        broken = sorted((c for c in chains if c.state == "broken"), key=lambda c: (len(_lost(c, online)), c.replica))
        if deficit > 0 and model.backoff:
            actions.append(Wait(model=model.name, reason="backing off after a failed repair"))
            continue
        waiting = False
        for c in broken:
            if deficit <= 0:
                actions.append(DropChain(model=model.name, replica=c.replica))
                continue
            if waiting:
                continue  # no spare for an earlier chain: none for this one either
            n = len(c.stages)
            wanted = [(k, model.stage_bytes(c.stages[k].first_layer, c.stages[k].last_layer_excl,
                                            first=k == 0, last=k == n - 1), c.stages[k]) for k in _lost(c, online)]
            picks = _pick(wanted, online, free, holding | taken)
            if picks is None:
                actions.append(Wait(model=model.name, reason=_missing(model.name, wanted, c.replica)))
                waiting = True
                continue
            _commit(picks, wanted, free, taken)
            actions.append(RepairChain(model=model.name, replica=c.replica,
                                       replacements=tuple((k, nid) for (k, _, _), nid in zip(wanted, picks))))
            deficit -= 1
        while deficit > 0 and not waiting:
            n = len(model.layout)
            wanted = [(k, model.stage_bytes(a, b, first=k == 0, last=k == n - 1), (a, b))
                      for k, (a, b) in enumerate(model.layout)]
            picks = _pick(wanted, online, free, holding | taken)
            if picks is None:
                actions.append(Wait(model=model.name, reason=_missing(model.name, wanted, None)))
                break
            _commit(picks, wanted, free, taken)
            actions.append(AddChain(model=model.name, stages=tuple(
                ChainStage(node_id=nid, first_layer=a, last_layer_excl=b)
                for (_, _, (a, b)), nid in zip(wanted, picks))))
            deficit -= 1
    return actions


def _lost(c: Chain, online: dict[str, HealNode]) -> list[int]:
    """Stage indices of ``c`` whose node lost the stage or is offline."""
    return [k for k, s in enumerate(c.stages) if s.node_id in c.lost_node_ids or s.node_id not in online]


def _pick(wanted: list, online: dict[str, HealNode], free: dict[str, int], exclude: set[str]) -> list[str] | None:
    """One distinct spare per wanted (index, bytes, _) or None. Largest stage first, so a big
    stage is not left without the one node that could hold it."""
    picks: dict[int, str] = {}
    used = set(exclude)
    for pos in sorted(range(len(wanted)), key=lambda i: (-wanted[i][1], i)):
        need = wanted[pos][1]
        spares = [n for n in online.values() if n.usable and n.node_id not in used and free[n.node_id] >= need]
        if not spares:
            return None
        best = min(spares, key=lambda n: (-n.tflops, -free[n.node_id], n.node_id))
        picks[pos] = best.node_id
        used.add(best.node_id)
    return [picks[i] for i in range(len(wanted))]


def _commit(picks: list[str], wanted: list, free: dict[str, int], taken: set[str]) -> None:
    for nid, (_, need, _) in zip(picks, wanted):
        free[nid] -= need
        taken.add(nid)


def _missing(model: str, wanted: list, replica: int | None) -> str:
    what = f"replica {replica} of {model!r}" if replica is not None else f"a new replica of {model!r}"
    most = max(w[1] for w in wanted)
    return (f"no spare node for {what}: {len(wanted)} stage(s) need a usable node without a stage of this model "
            f"(up to {most / 2**20:.1f} MiB free); start more nodes")
