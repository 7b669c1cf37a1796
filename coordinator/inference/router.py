"""The engine's side of per-request routes (coordinator/inference/routes.py has the protocol and
the choice): attach waiting sessions to route drivers, re-route a failed route's sessions, and
describe the routes in use for `swarm models` and the status page.

- ``pump(m)`` (under the engine's lock): each waiting session gets :func:`pick_route` over the
  model's ready chains (grouped by layer ranges: only chains with the same split can be mixed);
  the route's driver is created on first use and kept while it has sessions.
- a route driver's failed step: its nodes are probed; the chains holding a node that does not
  answer are failed (their own path: broken chain, healer); each session keeps the stages that
  answer and gets a new replica for each lost stage (``replay_stages``: the prefix is replayed
  through the stages up to the last lost one only). With no replica of a lost stage left, or
  when every node answered (the failure is not a lost node), the session goes back to the
  engine's queue for a whole replay, as with fixed chains.
"""

from __future__ import annotations

import logging
import math
import threading

from swarm.errors import SwarmError

from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session
from coordinator.inference.shape import model_shape
from coordinator.inference.routes import DEFAULT_HOP_S, Hop, LiveMap, RouteDriver, node_cost, pick_route

log = logging.getLogger(__name__)


class Routes:
    """Route drivers of every model served with ``--routes``. Methods named ``*_locked`` and
    ``pump`` run under the engine's lock."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.live = LiveMap()
        self._drivers: dict[tuple[str, tuple[int, ...]], RouteDriver] = {}  # (model, chain ids)
        self._lock = threading.Lock()
        self.num_reroutes = 0  # sessions moved to a new replica of a lost stage
        self.num_full_replays = 0  # sessions that fell back to a whole replay

    # ------------------------------------------------------------------ the live map
    def _groups(self, m) -> list[list[Replica]]:
        """Ready chains of ``m`` grouped by layer ranges (only those can be mixed)."""
        by_layout: dict[tuple, list[Replica]] = {}
        for r in sorted((r for r in m.replicas if r.state == "ready" and not isinstance(r, RouteDriver)),
                        key=lambda r: r.index):
            by_layout.setdefault(tuple((s.first_layer, s.last_layer_excl) for s in r.stages), []).append(r)
        return list(by_layout.values())

    def _drivers_of(self, m) -> list[RouteDriver]:
        with self._lock:
            return [d for (name, _), d in self._drivers.items() if name == m.record.name]

    def _queue(self, m) -> tuple[dict[str, int], dict[str, int], list[tuple[Hop, ...]]]:
        """(sessions per node, routes with sessions per node, those routes' hops)."""
        q: dict[str, int] = {}
        steps: dict[str, int] = {}
        active = []
        for d in self._drivers_of(m):
            n = d.num_sessions
            if n == 0:
                continue
            for nid in d.node_ids:
                q[nid] = q.get(nid, 0) + n
                steps[nid] = steps.get(nid, 0) + 1
            if d.state == "ready":
                active.append(tuple(Hop(replica=c.index, node_id=st.node_id) for c, st in zip(d.chains, d.stages)))
        return q, steps, active

    def _hop_s(self, node_ids: list[str]):
        delay, _, _ = self.engine.app.network.matrix(node_ids)
        index = {nid: i for i, nid in enumerate(node_ids)}

        def hop(a: str, b: str) -> float:
            d = float(delay[index[a]][index[b]]) if a != b else 0.0
            return d if math.isfinite(d) else DEFAULT_HOP_S
        return hop

    def choose(self, m, *, kept: RouteDriver | None = None, lost: tuple[int, ...] = ()):
        """(route choice, the chains of its hops) or None: the best route over ``m``'s ready
        chains. A re-route (``kept``: the failed route, ``lost``: its stages on lost nodes)
        keeps ``kept``'s other stages, even of a chain that failed meanwhile (its surviving
        stages stay loaded while the healer repairs it), and picks among chains of its layout."""
        groups = self._groups(m)
        fixed: dict[int, Hop] = {}
        if kept is not None:
            layout = tuple((s.first_layer, s.last_layer_excl) for s in kept.stages)
            groups = [g for g in groups if tuple((s.first_layer, s.last_layer_excl) for s in g[0].stages) == layout]
            groups = groups or [[]]
            fixed = {k: Hop(replica=c.index, node_id=st.node_id)
                     for k, (c, st) in enumerate(zip(kept.chains, kept.stages)) if k not in lost}
        queue, steps, active = self._queue(m)
        best = None
        for chains in groups:
            num_stages = len(chains[0].stages) if chains else len(kept.stages)
            stages = [[Hop(replica=r.index, node_id=r.stages[k].node_id) for r in chains] for k in range(num_stages)]
            for k, h in fixed.items():
                if h not in stages[k]:
                    stages[k].append(h)
            if any(not c for c in stages):
                continue
            ids = sorted({h.node_id for c in stages for h in c})
            per, fixed_s = self.live.costs(stages)
            choice = pick_route(stages, step_s=per, fixed_s=fixed_s, queue=queue, drivers=steps, active=active,
                                capacity=m.record.params.sessions_per_replica, hop_s=self._hop_s(ids), fixed=fixed)
            if choice is not None and (best is None or choice.predicted_s < best[0].predicted_s):
                by_index = {r.index: r for r in chains}
                if kept is not None:
                    by_index.update({k: c for k, c in ((c.index, c) for c in kept.chains) if k not in by_index})
                best = (choice, [by_index[h.replica] for h in choice.hops])
        return best

    def _driver(self, m, chains: list[Replica]) -> RouteDriver:
        # keyed by the chains themselves (a repaired chain keeps its index): a driver of stale
        # chains keeps its sessions until they finish or its step fails, and is pruned when idle
        key = (m.record.name, tuple(id(c) for c in chains))  # the driver holds them: ids stay unique
        with self._lock:
            d = self._drivers.get(key)
            if d is not None and d.state == "ready":
                return d
            p = m.record.params
            d = RouteDriver(chains=chains, live=self.live, security=self.engine.app.security,
                            max_sessions=p.sessions_per_replica * len(chains), on_failure=self._on_failure,
                            on_finish=self.engine._on_finish, on_decode_step=self.engine.memwatch.observer(
                                model_shape(m.config, p)))
            old, self._drivers[key] = self._drivers.get(key), d
        if old is not None:
            old.stop()
        d.start()
        return d

    # ------------------------------------------------------------------ sessions
    def pump(self, m) -> None:
        """Attach ``m``'s waiting sessions to their routes (under the engine's lock)."""
        self._prune(m)
        while m.waiting:
            s = m.waiting[0]
            if s.cancelled:
                m.waiting.popleft()
                continue
            best = self.choose(m)
            if best is None:
                return  # every node at capacity: the session waits
            m.waiting.popleft()
            self._driver(m, best[1]).attach(s)

    def _prune(self, m) -> None:
        """Stop idle drivers whose chains are no longer all ready."""
        ready = {id(r) for r in m.replicas if r.state == "ready"}
        with self._lock:
            idle = [(k, d) for k, d in self._drivers.items() if k[0] == m.record.name and d.num_sessions == 0
                    and not all(id(c) in ready for c in d.chains)]
            for k, _ in idle:
                del self._drivers[k]
        for _, d in idle:
            d.stop()

    def _on_failure(self, driver: Replica, sessions: list[Session], reason: str) -> None:
        def run() -> None:
            try:
                self._reroute(driver, sessions, reason)
            except Exception:  # noqa: BLE001 -- a bug must not strand the sessions silently
                log.exception("re-routing failed model=%s route=%s", driver.model, getattr(driver, "route", ()))
                for s in sessions:
                    s.fail(SwarmError("internal error while re-routing; see the coordinator's log"))
        self.engine._pool.submit(run)

    def _reroute(self, driver: RouteDriver, sessions: list[Session], reason: str) -> None:
        eng = self.engine
        with self._lock:
            for k, d in list(self._drivers.items()):
                if d is driver:
                    del self._drivers[k]
        dead = set(driver.probe())
        driver.stop()
        m = eng._models.get(driver.model)
        if m is None:
            for s in sessions:
                s.fail(SwarmError(f"model {driver.model!r} is no longer served"))
            return
        log.warning("route %s of %s failed (%s); lost nodes=%s", driver.route, m.record.name, reason,
                    [d[:12] for d in dead])
        for r in list(m.replicas):  # their own path: a broken chain, repaired by the healer
            if r.state == "ready" and dead & set(r.node_ids):
                eng.suspect(next(iter(dead & set(r.node_ids))))
                r.fail(f"node lost on route {driver.route}: {reason}")
        back = []
        with eng._lock:
            for s in sessions:
                if s.closed or s.cancelled:
                    continue
                s.pending = []
                s.num_replays += 1
                lost = [k for k, st in enumerate(driver.stages) if st.node_id in dead]
                # (no lost node: the step failed for another reason; a whole replay is the safe path)
                best = self.choose(m, kept=driver, lost=tuple(lost)) if s.kv_pos > 0 and lost else None
                if best is not None:
                    s.replay_stages = max(lost) + 1
                    self.num_reroutes += 1
                    log.info("session %s re-routed: stages %s -> %s (replays %d stage(s))", s.id[:8], driver.route,
                             tuple(c.index for c in best[1]), s.replay_stages)
                    self._driver(m, best[1]).attach(s)
                else:
                    s.kv_pos, s.replay_stages, s.replica = 0, 0, None
                    s.waiting_since_s = eng.app.clock.monotonic()
                    self.num_full_replays += 1
                    back.append(s)
            m.waiting.extendleft(reversed(back))
        eng._pump(m)

    def stop_model(self, m) -> list[Session]:
        """Stop ``m``'s route drivers; returns their sessions (the caller fails them)."""
        with self._lock:
            mine = [(k, d) for k, d in self._drivers.items() if k[0] == m.record.name]
            for k, _ in mine:
                del self._drivers[k]
        return [s for _, d in mine for s in d.stop()]

    # ------------------------------------------------------------------ views
    def views(self, m) -> list[dict]:
        """The routes of ``m`` with their sessions and predicted time per token now."""
        queue, steps, _ = self._queue(m)
        live = self.live.snapshot()
        out = []
        for d in sorted(self._drivers_of(m), key=lambda d: d.route):
            n = d.num_sessions
            if n == 0:
                continue
            ids = d.node_ids
            hop = self._hop_s(sorted(set(ids)))
            pred = sum(node_cost(live.get(nid, (0.0, 0.0))[0], queue.get(nid, 0) - 1, fixed_s=live.get(nid, (0.0, 0.0))[1],
                                 steps=steps.get(nid, 0)) for nid in ids)
            pred += sum(hop(a, b) for a, b in zip(ids, ids[1:]))
            out.append({"replicas": list(d.route), "node_ids": ids, "sessions": n, "predicted_s_per_token": pred})
        return out
