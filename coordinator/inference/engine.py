"""The coordinator's inference engine: served models, sessions, failover (placement and loading: placing.py).

- ``serve``: place a stored checkpoint on the online nodes (swarm.scheduling.placement) and
  load every stage (nodes fetch their layers); a model is ``ready`` when all replicas are.
- ``submit``: open a session on the least-loaded ready replica (or queue it while all are full
  or a re-placement is running); tokens go to the session's sink as they are sampled.
- failure: a replica whose step fails is dropped; its sessions are replayed (prompt + tokens so
  far) on another replica. With none left, the model is re-placed on the nodes that still
  answer and the sessions wait (a pause, not an error) until it is ready, or fail with a clear
  error after ``failover_timeout_s`` or when no placement is possible and no chain is serving
  or being loaded (the healer's: its nodes are busy loading, not free for the re-placement).
- healing (coordinator/inference/healer.py): a failed replica whose model still has others is
  kept as a *broken* chain (its surviving stages stay loaded); the healer moves its lost stages
  to spare nodes, or adds chains, until the model is back at its requested replica count.
- routes (``--routes``, coordinator/inference/router.py): sessions are attached to per-request
  routes over the chains' stages instead of to whole chains; a lost node re-routes only its stage.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from swarm.errors import (CapacityError, InvalidRequestError, NotFoundError, SwarmError,
                          UnavailableError)
from swarm.inference.referee import REFEREE_FLOPS_PER_S
from swarm.inference.sampling import SamplingParams
from swarm.inference.session import GenerationState
from swarm.model.checkpoint import load_config
from swarm.model.config import ModelConfig
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.inference import step_metadata

from coordinator.inference.checks import Checks
from coordinator.inference.disagg import Disagg
from coordinator.inference.memwatch import MemBandwidthWatch
from coordinator.inference.placing import Placing
from coordinator.inference.probation import Probations
from coordinator.inference.shape import model_shape  # noqa: F401 -- imported from here by the healer
from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session, StageRef
from coordinator.inference.router import Routes
from coordinator.inference.store import ModelRecord, ModelStore, served_params
from coordinator.inference.text import TextCodec

log = logging.getLogger(__name__)

SUSPECT_S = 120.0  # a node that failed a step is not placed on again for this long
# --hidden-codec auto: 8-bit hidden states on hops measured slower than this (bytes/s); a 4 KB
# hidden state (hidden 1024, fp32) then costs < 0.3 ms on the wire either way above it


@dataclass(slots=True)
class BrokenChain:
    """A failed replica whose surviving stages still hold their layers, waiting for repair.
    ``lost``: nodes that did not answer when it failed; ``capabilities``: the step capabilities
    its stages may hold (to unload them)."""

    index: int
    stages: list[StageRef]
    lost: set[str]
    capabilities: list[str]
    predicted_latency_s: float = 0.0


@dataclass(slots=True)
class ServedModel:
    record: ModelRecord
    config: ModelConfig
    text: TextCodec
    replicas: list[Replica] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    state: str = "placing"
    error: str = ""
    next_replica: int = 0
    replacing: bool = False
    requested: int = 0  # replica count to keep (0 until the first placement is done: nothing to heal)
    layout: tuple[tuple[int, int], ...] = ()  # layer ranges of the first placement's chain
    broken: list[BrokenChain] = field(default_factory=list)
    loading: list[Replica] = field(default_factory=list)  # chains the healer is loading
    heal_failures: int = 0
    heal_backoff_until_s: float = 0.0
    heal_note: str = ""  # why the model is below its replica count, when the healer waits
    num_checks: int = 0  # spot checks concluded (coordinator/inference/checks.py)
    num_check_failures: int = 0  # of them, the chains disagreed
    num_checks_void: int = 0  # sampled steps released unchecked (no other chain nor the referee could replay them)
    num_referee_checks: int = 0  # of num_checks, steps whose window the coordinator's referee replayed
    num_referee_void: int = 0  # windows void because the referee was over its budget (or backlog)

    def chains_node_ids(self) -> set[str]:
        """Nodes holding or loading a stage of this model (ready, loading, broken survivors)."""
        out = {nid for r in self.replicas for nid in r.node_ids}
        out |= {nid for r in self.loading for nid in r.node_ids}
        out |= {s.node_id for b in self.broken for s in b.stages if s.node_id not in b.lost}
        return out


class InferenceEngine(Placing):
    """Owns served models and their replicas. Thread-safe; never blocks an event loop in submit."""

    def __init__(self, app, store: ModelStore, *, failover_timeout_s: float = 60.0) -> None:
        self.app = app
        self.store = store
        self.failover_timeout_s = failover_timeout_s
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.RLock()
        self._suspects: dict[str, float] = {}  # node id -> monotonic time until which it is not placed on
        # (node id, model, replica, stage) -> (serialized assignment, the replica's step capability),
        # for ConfirmAssignment
        self._issued: dict[tuple[str, str, int, int], tuple[bytes, str]] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="inference")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="inference-reaper", daemon=True)
        self._reaper.start()
        self.healer = None  # coordinator.inference.healer.Healer, attached by the plugin
        self.checks = Checks(self, Probations(clock=app.clock, store=store), clock=app.clock,
                             referee_flops_per_s=getattr(app, "referee_flops_per_s", REFEREE_FLOPS_PER_S))
        self.routes = Routes(self)
        self.disagg = Disagg(self)
        self.memwatch = MemBandwidthWatch(lambda: app.registry.trust)

    def close(self) -> None:
        self._stop.set()
        if self.healer is not None:
            self.healer.stop()
        with self._lock:
            models = list(self._models.values())
        for m in models:
            for s in self.routes.stop_model(m):
                s.fail(UnavailableError("the coordinator is shutting down"))
            for r in m.replicas + m.loading:
                for s in r.stop(unload=False):
                    s.fail(UnavailableError("the coordinator is shutting down"))
        self.checks.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ queries
    def get(self, name: str) -> ServedModel:
        with self._lock:
            m = self._models.get(name)
        if m is None:
            raise NotFoundError(f"model {name!r} is not served; `swarm models` lists what is")
        return m

    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    # ------------------------------------------------------------------ serving
    def serve(self, record: ModelRecord) -> ServedModel:
        """Place and load a stored model (blocking). Replaces a model of the same name."""
        config = load_config(record.dir)
        params = served_params(record.params, config.max_position_embeddings)
        if params != record.params:  # the context actually served is what `swarm models` shows
            record = replace(record, params=params)
            self.store.put(record)
        text = TextCodec(record.dir, vocab_size=config.vocab_size)
        with self._lock:
            old = self._models.pop(record.name, None)
        if old is not None:
            self._retire(old, "the model was replaced by a new upload")
        m = ServedModel(record=record, config=config, text=text)
        with self._lock:
            self._models[record.name] = m
        try:
            if not self.disagg.place_if_chosen(m):  # --disaggregate on, or auto predicting a gain
                self._place(m, exclude=set())
            ready = sorted((r for r in m.replicas if r.state == "ready"), key=lambda r: r.index)
            m.layout = tuple((s.first_layer, s.last_layer_excl) for s in ready[0].stages)
            m.requested = record.params.num_replicas or len(ready)  # "as many as fit": as many as fit now
        except SwarmError as exc:
            m.state, m.error = "failed", str(exc)
            self.store.set_state(record.name, "failed", str(exc))
            with self._lock:
                self._models.pop(record.name, None)
            raise
        self.store.set_state(record.name, m.state)
        self.disagg.assess(m)  # served colocated: what disaggregating would give, for `swarm models`
        return m

    def unserve(self, name: str) -> bool:
        with self._lock:
            m = self._models.pop(name, None)
        if m is not None:
            self._retire(m, f"model {name!r} is no longer served")
        self.disagg.forget(name)
        return self.store.remove(name) or m is not None

    def _retire(self, m: ServedModel, why: str) -> None:
        m.requested = 0  # nothing left to heal
        for s in self.routes.stop_model(m):
            s.fail(UnavailableError(why))
        for r in m.replicas + m.loading:
            for s in r.stop(unload=True):
                s.fail(UnavailableError(why))
        for b in list(m.broken):
            self.drop_broken(m, b)
        while m.waiting:
            m.waiting.popleft().fail(UnavailableError(why))

    def suspect(self, node_id: str, for_s: float = SUSPECT_S) -> None:
        """Do not place on ``node_id`` for ``for_s`` seconds (it failed a step or a load); a longer
        suspicion already running is kept."""
        until = self.app.clock.monotonic() + for_s
        with self._lock:
            self._suspects[node_id] = max(until, self._suspects.get(node_id, until))

    def suspects(self) -> set[str]:
        now = self.app.clock.monotonic()
        with self._lock:
            return {nid for nid, until in self._suspects.items() if now < until}

    def replica_count(self, m: ServedModel) -> tuple[int, int]:
        """(healthy, requested): ready replicas whose nodes are all online, and the count to keep."""
        online = {n.id for n in self.app.registry.online()}
        healthy = sum(r.state == "ready" and all(nid in online for nid in r.node_ids) for r in list(m.replicas))
        return healthy, m.requested

    def drop_broken(self, m: ServedModel, b: BrokenChain) -> None:
        """Forget a broken chain and unload its surviving stages (best effort)."""
        with self._lock:
            if b in m.broken:
                m.broken.remove(b)
        for k, st in enumerate(b.stages):
            if st.node_id in b.lost:
                continue
            for cap in b.capabilities:
                try:
                    with data_channel(st.address, security=self.app.security, node_id=st.node_id) as ch:
                        if pb_grpc.InferenceStageStub(ch).UnloadStage(
                                pb.ServeUnloadStageRequest(model_name=m.record.name, replica=b.index), timeout=3,
                                metadata=step_metadata(cap)).unloaded:
                            break
                except grpc.RpcError:
                    continue  # another capability, or the node is gone: its stage expires with it

    def is_placed(self, node_id: str, model_name: str) -> bool:
        """Whether this coordinator issued ``node_id`` an assignment of ``model_name``."""
        with self._lock:
            return any(k[0] == node_id and k[1] == model_name for k in self._issued)

    def confirm(self, node_id: str, assignment: pb.ServeStageAssignment) -> str | None:
        """The step capability of the assignment's chain if this coordinator issued exactly
        ``assignment`` to ``node_id``, else None."""
        key = (node_id, assignment.model_name, assignment.replica, assignment.stage)
        with self._lock:
            issued = self._issued.get(key)
        if issued is None or issued[0] != assignment.SerializeToString(deterministic=True):
            return None
        return issued[1]

    def submit(self, name: str, *, prompt_ids: list[int], params: SamplingParams, sink) -> Session:
        """Open a session (non-blocking). Raises NotFoundError / InvalidRequestError / CapacityError."""
        m = self.get(name)
        limit = m.record.params.max_seq_len
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise InvalidRequestError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"{limit}-token context {name!r} is served with; shorten the prompt or ask for fewer tokens"
            )
        if any(not 0 <= t < m.config.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {m.config.vocab_size})")
        state = GenerationState(prompt_ids=prompt_ids, params=params, decode=m.text.decode, eos_token_id=m.text.eos_token_id)
        s = Session(session_id=uuid.uuid4().hex, model=name, state=state, sink=sink)
        with self._lock:
            if not any(r.state == "ready" for r in m.replicas) and not m.replacing:
                raise CapacityError(f"model {name!r} has no working replica; serve it again when nodes are back")
            s.waiting_since_s = self.app.clock.monotonic()
            m.waiting.append(s)
        self._pump(m)
        return s

    def cancel(self, s: Session) -> None:
        s.cancelled = True
        m = self._models.get(s.model)
        if m is not None:
            with self._lock:
                if s in m.waiting:
                    m.waiting.remove(s)

    def _pump(self, m: ServedModel) -> None:
        """Attach waiting sessions to replicas with room (least loaded first), or to routes."""
        with self._lock:
            if m.record.params.routes:
                self.routes.pump(m)
                return
            if self.disagg.pump(m):
                return
            while m.waiting:
                ready = [r for r in m.replicas if r.has_room()]
                if not ready:
                    return
                s = m.waiting.popleft()
                if s.cancelled:
                    continue
                min(ready, key=lambda r: (r.num_sessions, r.predicted_latency_s, r.index)).attach(s)

    def _on_finish(self, replica: Replica, s: Session | None) -> None:
        """A session of ``replica`` finished, or (None) slots of its stages were freed: attach waiting sessions."""
        m = self._models.get(replica.model)
        if m is not None:
            self._pump(m)

    def _on_replica_failure(self, replica: Replica, sessions: list[Session], reason: str) -> None:
        m = self._models.get(replica.model)
        if m is None:
            for s in sessions:
                s.fail(UnavailableError(f"model {replica.model!r} is no longer served"))
            return
        with self._lock:
            if replica in m.replicas:
                m.replicas.remove(replica)
            for s in sessions:
                s.kv_pos = 0
                s.pending = []  # tokens held for a check are dropped: the replay computes them again
                s.num_replays += 1
                s.replica = None
                s.waiting_since_s = self.app.clock.monotonic()
            m.waiting.extendleft(reversed(sessions))
            need_replace = not any(r.state == "ready" for r in m.replicas) and not m.replacing
            if need_replace:
                m.replacing = True
                m.state = "placing"
            else:
                m.state = "degraded"
        self._pool.submit(self._finish_failure, m, replica, need_replace)

    def _finish_failure(self, m: ServedModel, replica: Replica, need_replace: bool) -> None:
        dead = replica.probe()
        for nid in dead:
            self.suspect(nid)
        log.warning("replica %d of %s lost; unreachable nodes=%s", replica.index, m.record.name, [d[:12] for d in dead])
        if not need_replace and m.requested:
            # keep the survivors loaded: the healer moves only the lost stages to spare nodes
            replica.stop(unload=False)
            with self._lock:
                m.broken.append(BrokenChain(index=replica.index, stages=list(replica.stages), lost=set(dead),
                                            capabilities=[replica.capability],
                                            predicted_latency_s=replica.predicted_latency_s))
            if self.healer is not None:
                self.healer.poke()
            self._pump(m)
            return
        replica.stop(unload=True)
        if not need_replace:
            self._pump(m)
            return
        for b in list(m.broken):  # their survivors may be needed for the re-placement
            self.drop_broken(m, b)
        try:
            exclude = self.suspects()
            self._place(m, exclude=exclude, num_replicas=1, strict=False)
            self.store.set_state(m.record.name, m.state)
        except SwarmError as exc:
            with self._lock:
                # a chain still serving, or one the healer is loading (its nodes are busy with it, so
                # they were no candidates here): the sessions wait for it (a pause, not an error; the
                # reaper fails them after failover_timeout_s if it never comes)
                coming = any(r.state == "ready" for r in m.replicas) or bool(m.loading)
                if coming:
                    m.state, m.error = "degraded", str(exc)
                    waiting = []
                else:
                    m.state, m.error = "failed", str(exc)
                    waiting = list(m.waiting)
                    m.waiting.clear()
            if coming:
                log.warning("re-placement of %s failed (%s); its sessions wait for the chains serving or loading",
                            m.record.name, exc)
            else:
                log.error("re-placement of %s failed: %s", m.record.name, exc)
            for s in waiting:
                s.fail(CapacityError(f"no capacity left to serve {m.record.name!r} after a node failure: {exc}"))
        finally:
            m.replacing = False
        self._pump(m)

    def _reap_loop(self) -> None:
        """Fail sessions that waited too long for a replica (no capacity came back)."""
        while not self._stop.wait(1.0):
            now = self.app.clock.monotonic()
            for m in self.models():
                expired = []
                with self._lock:
                    for s in list(m.waiting):
                        if now - s.waiting_since_s > self.failover_timeout_s:
                            m.waiting.remove(s)
                            expired.append(s)
                for s in expired:
                    s.fail(CapacityError(
                        f"no replica of {m.record.name!r} had room within {self.failover_timeout_s:.0f} s; "
                        "retry later or serve more replicas"))
