"""The healing loop: keeps every served model at its requested replica count.

Protocol (coordinator side): every ``interval_s`` (and at once after a replica failed) the
healer takes a snapshot of the engine -- each model's needs, the online nodes (memory left
after the stages they hold, usable unless suspected after a failure), every chain (ready,
loading, broken) -- and asks :func:`swarm.scheduling.healing.heal` what to do. It carries the
actions out:

- ``RetireChain``: fail the replica (its sessions fail over); next tick it is broken;
- ``RepairChain``: load the broken chain again under its replica index, with a new step
  capability, its lost stages on the chosen spares. A spare fetches only its layers, from a
  peer holding them when there is one; a surviving stage's node reuses the layers it holds
  (same model, digest and layers: no fetch);
- ``AddChain``: load a new chain with the model's layout;
- ``DropChain``: unload a broken chain the model no longer needs;
- ``Wait``: record why (``swarm models`` shows it) and try again next tick.

A failed load is data: the nodes that do not answer are suspected for SUSPECT_S; when all
answer, the new nodes (the spares) are suspected for LOAD_SUSPECT_S, doubling with each failed
load on the same node up to SUSPECT_S (a transient fault is retried soon, a node that keeps
failing waits longer); the model backs off (1, 2, 4 ... 30 s) and the chain stays broken.
"""

from __future__ import annotations

import logging
import threading

from swarm.scheduling.healing import (AddChain, Chain, ChainStage, DropChain, HealNode, ModelNeeds, RepairChain,
                                      RetireChain, Wait, heal)

from coordinator.inference.engine import SUSPECT_S, BrokenChain, InferenceEngine, ServedModel, model_shape
from coordinator.inference.replica import Replica
from coordinator.inference.sessions import StageRef

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
LOAD_SUSPECT_S = 5.0  # a spare that answers but failed a load is first passed over for this long


def load_suspicion_s(strikes: int) -> float:
    """How long a node that answers but failed a load is passed over, after ``strikes`` earlier
    such failures: LOAD_SUSPECT_S, doubling, at most SUSPECT_S."""
    return min(SUSPECT_S, LOAD_SUSPECT_S * 2.0 ** min(strikes, 32))


class Healer:
    """Runs :func:`heal` on a thread and carries out its actions through the engine."""

    def __init__(self, engine: InferenceEngine, *, interval_s: float = 1.0) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inference-healer", daemon=True)
        self._load_strikes: dict[str, int] = {}  # node id -> loads that failed on it while it answered
        engine.healer = self

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def poke(self) -> None:
        """Tick now (a replica just failed)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # noqa: BLE001 -- a bug must not end healing for good
                log.exception("healing tick failed")

    # ------------------------------------------------------------------ snapshot -> actions
    def snapshot(self) -> tuple[list[ModelNeeds], list[HealNode], list[Chain]]:
        e = self.engine
        now = e.app.clock.monotonic()
        models, chains = [], []
        for m in e.models():
            if m.replacing or not m.requested or not m.layout:
                continue  # placing for the first time, or re-placing after losing every replica
            p = m.record.params
            shape = model_shape(m.config, p)
            kv = shape.kv_bytes_per_token_per_layer * p.max_seq_len * p.sessions_per_replica
            with e._lock:
                ready = sorted((r for r in m.replicas if r.state == "ready"), key=lambda r: r.index)
                layout = tuple((s.first_layer, s.last_layer_excl) for s in ready[0].stages) if ready else m.layout
                for r in m.replicas + m.loading:
                    chains.append(_chain(m, r.index, "ready" if r in m.replicas and r.state == "ready" else "loading",
                                         r.stages))
                for b in m.broken:
                    chains.append(_chain(m, b.index, "broken", b.stages, lost=b.lost))
            models.append(ModelNeeds(name=m.record.name, requested=m.requested, layout=layout,
                                     layer_bytes=shape.layer_bytes + kv, embed_bytes=shape.embed_bytes,
                                     head_bytes=shape.head_bytes, backoff=now < m.heal_backoff_until_s))
        suspects = e.suspects()
        nodes = [
            HealNode(node_id=n.id, tflops=max(n.planning_tflops, 1e-6), usable=n.id not in suspects,
                     memory_free_bytes=max(0, int(n.hardware.memory_free_bytes or n.hardware.memory_bytes) - e._reserved(n.id)))
            for n in e.app.registry.online() if n.peer_address
        ]
        return models, nodes, chains

    def tick(self) -> list:
        """One decision and its (started) actions; returns the actions."""
        models, nodes, chains = self.snapshot()
        actions = heal(models, nodes, chains)
        for a in actions:
            try:
                m = self.engine.get(a.model)
            except Exception:  # noqa: BLE001 -- unserved meanwhile
                continue
            if isinstance(a, RetireChain):
                self._retire(m, a)
            elif isinstance(a, RepairChain):
                self._repair(m, a)
            elif isinstance(a, AddChain):
                self._add(m, a)
            elif isinstance(a, DropChain):
                b = next((b for b in m.broken if b.index == a.replica), None)
                if b is not None:
                    log.info("dropping broken replica model=%s replica=%d (model at its replica count)", m.record.name, b.index)
                    self.engine._pool.submit(self.engine.drop_broken, m, b)
            elif isinstance(a, Wait) and a.reason != m.heal_note:
                m.heal_note = a.reason
                log.warning("healing waits model=%s: %s", m.record.name, a.reason)
        return actions

    # ------------------------------------------------------------------ actions
    def _retire(self, m: ServedModel, a: RetireChain) -> None:
        r = next((r for r in m.replicas if r.index == a.replica and r.state == "ready"), None)
        if r is not None:
            log.warning("retiring replica model=%s replica=%d: %s", m.record.name, r.index, a.reason)
            r.state = "failing"  # not ready: the next tick does not retire it again
            self.engine._pool.submit(r.fail, a.reason)

    def _repair(self, m: ServedModel, a: RepairChain) -> None:
        e = self.engine
        b = next((b for b in m.broken if b.index == a.replica), None)
        if b is None:
            return
        online = {n.id: n for n in e.app.registry.online()}
        stages = list(b.stages)
        for k, nid in a.replacements:
            node = online.get(nid)
            if node is None or not node.peer_address:
                return  # gone since the snapshot: the next tick decides again
            stages[k] = StageRef(node_id=nid, address=node.peer_address, first_layer=stages[k].first_layer,
                                 last_layer_excl=stages[k].last_layer_excl)
        replica = self._replica(m, b.index, stages, b.predicted_latency_s)
        with e._lock:
            m.broken.remove(b)
            m.loading.append(replica)
        log.info("repairing replica model=%s replica=%d moves=%s", m.record.name, b.index,
                 [(k, b.stages[k].node_id[:8], nid[:8]) for k, nid in a.replacements])
        e._pool.submit(self._load, m, replica, b, {nid for _, nid in a.replacements})

    def _add(self, m: ServedModel, a: AddChain) -> None:
        e = self.engine
        online = {n.id: n for n in e.app.registry.online()}
        if any(s.node_id not in online for s in a.stages):
            return
        with e._lock:
            index = m.next_replica
            m.next_replica += 1
        stages = [StageRef(node_id=s.node_id, address=online[s.node_id].peer_address, first_layer=s.first_layer,
                           last_layer_excl=s.last_layer_excl) for s in a.stages]
        replica = self._replica(m, index, stages, max((r.predicted_latency_s for r in m.replicas), default=0.0))
        with e._lock:
            m.loading.append(replica)
        log.info("adding replica model=%s replica=%d chain=%s", m.record.name, index,
                 [(s.node_id[:8], s.first_layer, s.last_layer_excl) for s in stages])
        e._pool.submit(self._load, m, replica, None, {s.node_id for s in stages})

    def _replica(self, m: ServedModel, index: int, stages: list[StageRef], latency_s: float) -> Replica:
        e, p = self.engine, m.record.params
        return Replica(model=m.record.name, index=index, stages=stages, max_sessions=p.sessions_per_replica,
                       security=e.app.security, on_failure=e._on_replica_failure,
                       on_finish=e._on_finish, predicted_latency_s=latency_s, checks=e.checks,
                       verify_prob=p.verify_prob, on_decode_step=e.memwatch.observer(model_shape(m.config, p)))

    def _load(self, m: ServedModel, replica: Replica, was: BrokenChain | None, new_nodes: set[str]) -> None:
        e = self.engine
        t0 = e.app.clock.monotonic()
        try:
            e._load_replica(m, replica)
        except Exception as exc:  # noqa: BLE001 -- a failed load is data: back off, keep the chain broken
            dead = replica.probe()
            for nid in dead:
                e.suspect(nid)
            for nid in (new_nodes if not dead else ()):
                # a new node that answers yet failed the load: a transient fault (a TLS handshake cut
                # short on a loaded machine, seen in CI) is retried soon, a node that keeps failing
                # waits longer each time (LOAD_SUSPECT_S, doubling, up to SUSPECT_S)
                strikes = self._load_strikes.get(nid, 0)
                self._load_strikes[nid] = strikes + 1
                e.suspect(nid, for_s=load_suspicion_s(strikes))
            replica.stop(unload=False)
            with e._lock:
                if replica in m.loading:
                    m.loading.remove(replica)
                m.heal_failures += 1
                m.heal_backoff_until_s = e.app.clock.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (m.heal_failures - 1))
                m.heal_note = f"loading replica {replica.index} failed: {exc}"
                if was is not None and m.requested:
                    m.broken.append(BrokenChain(index=replica.index, stages=list(replica.stages),
                                                lost=set(dead) | (new_nodes if not dead else set()),
                                                capabilities=was.capabilities + [replica.capability],
                                                predicted_latency_s=replica.predicted_latency_s))
            log.warning("healing load failed model=%s replica=%d unreachable=%s: %s", m.record.name, replica.index,
                        [d[:12] for d in dead], exc)
            return
        with e._lock:
            if replica not in m.loading or not m.requested:  # unserved or replaced meanwhile
                stale = True
            else:
                stale = False
                m.loading.remove(replica)
                replica.start()
                m.replicas.append(replica)
                m.heal_failures, m.heal_note = 0, ""
        for nid in new_nodes:
            self._load_strikes.pop(nid, None)
        if stale:
            replica.stop(unload=True)
            return
        healthy, requested = e.replica_count(m)
        m.state = "ready" if healthy >= requested else "degraded"
        m.error = ""
        e.store.set_state(m.record.name, m.state)
        log.info("healed model=%s replica=%d load_s=%.2f replicas=%d/%d", m.record.name, replica.index,
                 e.app.clock.monotonic() - t0, healthy, requested)
        e._pump(m)


def _chain(m: ServedModel, index: int, state: str, stages: list[StageRef], lost: set[str] | None = None) -> Chain:
    return Chain(model=m.record.name, replica=index, state=state, lost_node_ids=frozenset(lost or ()),
                 stages=tuple(ChainStage(node_id=s.node_id, first_layer=s.first_layer, last_layer_excl=s.last_layer_excl)
                              for s in stages))
