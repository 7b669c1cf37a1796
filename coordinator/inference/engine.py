"""The coordinator's inference engine: served models, placement, sessions, failover.

- ``serve``: place a stored checkpoint on the online nodes (swarm.scheduling.placement) and
  load every stage (nodes fetch their layers); a model is ``ready`` when all replicas are.
- ``submit``: open a session on the least-loaded ready replica (or queue it while all are full
  or a re-placement is running); tokens go to the session's sink as they are sampled.
- failure: a replica whose step fails is dropped; its sessions are replayed (prompt + tokens so
  far) on another replica. With none left, the model is re-placed on the nodes that still
  answer and the sessions wait (a pause, not an error) until it is ready, or fail with a clear
  error after ``failover_timeout_s`` or when no placement is possible.
- healing (coordinator/inference/healer.py): a failed replica whose model still has others is
  kept as a *broken* chain (its surviving stages stay loaded); the healer moves its lost stages
  to spare nodes, or adds chains, until the model is back at its requested replica count.
- routes (``--routes``, coordinator/inference/router.py): sessions are attached to per-request
  routes over the chains' stages instead of to whole chains; a lost node re-routes only its stage.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from swarm.errors import (CapacityError, InfeasiblePlanError, InvalidRequestError, NotFoundError, SwarmError,
                          UnavailableError)
from swarm.inference.sampling import SamplingParams
from swarm.inference.session import GenerationState
from swarm.model.checkpoint import load_config
from swarm.model.config import ModelConfig
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.scheduling.placement import Links, PlacementDevice, PlacementRequest, place
from swarm.transport.channels import data_channel
from swarm.transport.errors import error_from_rpc
from swarm.transport.inference import step_metadata

from coordinator.inference.checks import Checks
from coordinator.inference.disagg import Disagg
from coordinator.inference.shape import model_shape
from coordinator.inference.replica import Replica, Session, StageRef
from coordinator.inference.router import Routes
from coordinator.inference.routes import shared_split
from coordinator.inference.store import ModelRecord, ModelStore, served_params
from coordinator.inference.text import TextCodec

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0
DEFAULT_DELAY_S = 0.005  # unmeasured links: assume a LAN-ish hop
DEFAULT_BANDWIDTH_BPS = 125e6
SUSPECT_S = 120.0  # a node that failed a step is not placed on again for this long
# --hidden-codec auto: 8-bit hidden states on hops measured slower than this (bytes/s); a 4 KB
# hidden state (hidden 1024, fp32) then costs < 0.3 ms on the wire either way above it
AUTO_INT8_BELOW_BPS = 12.5e6  # 100 Mbit/s


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
    num_checks_void: int = 0  # sampled steps released unchecked (no other chain could replay them)

    def chains_node_ids(self) -> set[str]:
        """Nodes holding or loading a stage of this model (ready, loading, broken survivors)."""
        out = {nid for r in self.replicas for nid in r.node_ids}
        out |= {nid for r in self.loading for nid in r.node_ids}
        out |= {s.node_id for b in self.broken for s in b.stages if s.node_id not in b.lost}
        return out


class InferenceEngine:
    """Owns served models and their replicas. Thread-safe; never blocks an event loop in submit."""

    def __init__(self, app, store: ModelStore, *, failover_timeout_s: float = 60.0) -> None:
        self.app = app
        self.store = store
        self.failover_timeout_s = failover_timeout_s
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.RLock()
        self._suspects: dict[str, float] = {}
        # (node id, model, replica, stage) -> (serialized assignment, the replica's step capability),
        # for ConfirmAssignment
        self._issued: dict[tuple[str, str, int, int], tuple[bytes, str]] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="inference")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="inference-reaper", daemon=True)
        self._reaper.start()
        self.healer = None  # coordinator.inference.healer.Healer, attached by the plugin
        self.checks = Checks(self)
        self.routes = Routes(self)
        self.disagg = Disagg(self)

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
            if record.params.disaggregate:
                self.disagg.place(m)
            else:
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
        if not record.params.disaggregate:
            self.disagg.assess(m)  # what disaggregating would give, for `swarm models`
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

    def _place(self, m: ServedModel, *, exclude: set[str], num_replicas: int | None = None, strict: bool = True) -> None:
        """Plan replicas over online nodes (minus ``exclude`` and nodes busy with this model)
        and load them. Raises InfeasiblePlanError / UnavailableError."""
        p = m.record.params
        nodes, devices = self._candidates(m, exclude)
        want = p.num_replicas if num_replicas is None else num_replicas
        stages = p.num_stages
        if stages is not None and len(nodes) < stages * (want or 1):
            if strict:
                raise InfeasiblePlanError(
                    f"{stages} stage(s) x {want or 1} replica(s) need {stages * (want or 1)} nodes, "
                    f"{len(nodes)} are online; lower --stages/--replicas or start more nodes")
            # after a failure: keep serving with shorter chains rather than not at all
            stages = max(1, len(nodes) // (want or 1)) if nodes else None
        links = self._links([n.id for n in nodes])
        request = PlacementRequest(
            num_replicas=want, sessions_per_replica=p.sessions_per_replica, max_seq_len=p.max_seq_len,
            objective=p.objective, num_stages=stages,
        )
        placement = place(devices, links, model_shape(m.config, p), request)
        by_id = {n.id: n for n in nodes}
        replicas = []
        splits = [[(s.first_layer, s.last_layer_excl) for s in rp.stages] for rp in placement.replicas]
        if p.routes:  # only chains with the same layer ranges can feed each other's stages
            splits = shared_split(splits)
        for rp, split in zip(placement.replicas, splits):
            with self._lock:
                index = m.next_replica
                m.next_replica += 1
            refs = [StageRef(node_id=s.node_id, address=by_id[s.node_id].peer_address, first_layer=a,
                             last_layer_excl=b) for s, (a, b) in zip(rp.stages, split)]
            replicas.append(self._new_replica(m, index, refs, rp.latency_s))
        self._load_all(m, replicas)

    def _candidates(self, m: ServedModel, exclude: set[str]) -> tuple[list, list[PlacementDevice]]:
        """(online nodes with a peer address, not in ``exclude`` nor busy with ``m``, by id; their
        placement devices: measured TFLOPS, memory left after other models' stages)."""
        busy = {nid for r in m.replicas if r.state == "ready" for nid in r.node_ids}
        busy |= {nid for r in m.loading for nid in r.node_ids}
        nodes = [n for n in self.app.registry.online() if n.id not in exclude and n.id not in busy and n.peer_address]
        nodes.sort(key=lambda n: n.id)
        devices = [
            PlacementDevice(node_id=n.id, tflops=max(n.planning_tflops, 1e-6),
                            memory_bytes=max(0, int(n.hardware.memory_free_bytes or n.hardware.memory_bytes)
                                             - self._reserved(n.id)))
            for n in nodes
        ]
        return nodes, devices

    def _new_replica(self, m: ServedModel, index: int, refs: list[StageRef], latency_s: float) -> Replica:
        p = m.record.params
        return Replica(model=m.record.name, index=index, stages=refs, max_sessions=p.sessions_per_replica,
                       security=self.app.security, on_failure=self._on_replica_failure, on_finish=self._on_finish,
                       predicted_latency_s=latency_s, checks=self.checks, verify_prob=p.verify_prob)

    def _load_all(self, m: ServedModel, replicas: list[Replica]) -> None:
        """Load ``replicas`` at once and start those that loaded; raises UnavailableError when none did."""
        futures = [(r, self._pool.submit(self._load_replica, m, r)) for r in replicas]
        errors = []
        for replica, fut in futures:
            try:
                fut.result(timeout=LOAD_TIMEOUT_S + 5)
            except Exception as exc:  # noqa: BLE001 -- one replica failing to load is data
                errors.append(f"replica {replica.index}: {exc}")
                replica.stop(unload=True)
                continue
            replica.start()
            with self._lock:
                m.replicas.append(replica)
            log.info("replica ready model=%s replica=%d chain=%s", m.record.name, replica.index,
                     [(s.node_id[:8], s.first_layer, s.last_layer_excl) for s in replica.stages])
        if not any(r.state == "ready" for r in m.replicas):
            raise UnavailableError(f"no replica of {m.record.name!r} could be loaded: {errors}")
        m.state = "ready" if not errors else "degraded"
        m.error = "; ".join(errors)
        self._pump(m)

    def _reserved(self, node_id: str) -> int:
        """Memory other served models' stages take on a node (bytes, estimated)."""
        total = 0
        for m in self.models():
            shape = model_shape(m.config, m.record.params)
            kv = shape.kv_bytes_per_token_per_layer * m.record.params.max_seq_len * m.record.params.sessions_per_replica
            chains = [r.stages for r in m.replicas if r.state == "ready"] + [r.stages for r in m.loading]
            chains += [[s for s in b.stages if s.node_id not in b.lost] for b in m.broken]
            for stages in chains:
                for s in stages:
                    if s.node_id == node_id:
                        total += (s.last_layer_excl - s.first_layer) * (shape.layer_bytes + kv)
        return total

    def suspect(self, node_id: str) -> None:
        """Do not place on ``node_id`` for SUSPECT_S (it failed a step or a load)."""
        with self._lock:
            self._suspects[node_id] = self.app.clock.monotonic()

    def suspects(self) -> set[str]:
        now = self.app.clock.monotonic()
        with self._lock:
            return {nid for nid, t in self._suspects.items() if now - t < SUSPECT_S}

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

    def _links(self, ids: list[str]) -> Links:
        if not ids:
            return Links(delay_s=(), bandwidth_Bps=())
        delay, bw, _ = self.app.network.matrix(ids)
        n = len(ids)
        d = tuple(tuple(0.0 if i == j else (float(delay[i][j]) if math.isfinite(delay[i][j]) else DEFAULT_DELAY_S)
                        for j in range(n)) for i in range(n))
        b = tuple(tuple(math.inf if i == j else (float(bw[i][j]) if math.isfinite(bw[i][j]) and bw[i][j] > 0 else DEFAULT_BANDWIDTH_BPS)
                        for j in range(n)) for i in range(n))
        return Links(delay_s=d, bandwidth_Bps=b)

    def _load_replica(self, m: ServedModel, replica: Replica) -> None:
        p = m.record.params
        n = len(replica.stages)
        for k, st in enumerate(replica.stages):
            nxt = replica.stages[k + 1] if k + 1 < n else None
            prev = replica.stages[k - 1] if k > 0 else None
            sources = self._peer_sources(m, st, first=k == 0, last=k == n - 1) + [("coordinator", "")]
            a = pb.ServeStageAssignment(
                model_name=m.record.name, model_digest=m.record.digest, replica=replica.index, stage=k, num_stages=n,
                first_layer=st.first_layer, last_layer_excl=st.last_layer_excl,
                next_address=nxt.address if nxt else "", next_node_id=nxt.node_id if nxt else "",
                prev_node_id=prev.node_id if prev else "",
                max_seq_len=p.max_seq_len, max_sessions=p.sessions_per_replica,
                hidden_codec=self._hop_codec(p.hidden_codec, st, nxt),
                shard_sources=[a for a, _ in sources], shard_source_node_ids=[i for _, i in sources],
                session_timeout_s=p.session_timeout_s, dtype=p.dtype,
                kv_source_node_ids=self.disagg.kv_sources(m, replica, k),
            )
            with self._lock:
                if len(self._issued) > 10_000:  # bounded: forget the oldest
                    for key in list(self._issued)[:1000]:
                        del self._issued[key]
                self._issued[(st.node_id, m.record.name, replica.index, k)] = (
                    a.SerializeToString(deterministic=True), replica.capability)
            with data_channel(st.address, security=self.app.security, node_id=st.node_id) as ch:
                try:
                    pb_grpc.InferenceStageStub(ch).LoadStage(pb.ServeLoadStageRequest(assignment=a), timeout=LOAD_TIMEOUT_S)
                except grpc.RpcError as exc:
                    raise error_from_rpc(exc, f"node {st.node_id[:12]} at {st.address}") from exc

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

    def _hop_codec(self, codec: str, st: StageRef, nxt: StageRef | None) -> str:
        """The codec on the hop st -> nxt: as asked, or for ``auto`` int8 where the measured
        bandwidth is below AUTO_INT8_BELOW_BPS (unmeasured links stay raw)."""
        if codec != "auto":
            return codec
        if nxt is None:
            return "none"
        _, bw, _ = self.app.network.matrix([st.node_id, nxt.node_id])
        measured = float(bw[0][1])
        return "int8" if math.isfinite(measured) and measured < AUTO_INT8_BELOW_BPS else "none"

    def _peer_sources(self, m: ServedModel, st: StageRef, *, first: bool, last: bool) -> list[tuple[str, str]]:
        """Peers already holding a superset of these layers: fetch from them first."""
        out = []
        for r in m.replicas:
            if r.state != "ready":
                continue
            n = len(r.stages)
            for k, s in enumerate(r.stages):
                if (s.first_layer <= st.first_layer and st.last_layer_excl <= s.last_layer_excl
                        and (not first or k == 0) and (not last or k == n - 1) and s.node_id != st.node_id):
                    out.append((s.address, s.node_id))
        return out[:2]

    # ------------------------------------------------------------------ sessions
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

    def _on_finish(self, replica: Replica, s: Session) -> None:
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
        now = self.app.clock.monotonic()
        with self._lock:
            for nid in dead:
                self._suspects[nid] = now
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
            exclude = {nid for nid, t in self._suspects.items() if now - t < SUSPECT_S}
            self._place(m, exclude=exclude, num_replicas=1, strict=False)
            self.store.set_state(m.record.name, m.state)
        except SwarmError as exc:
            log.error("re-placement of %s failed: %s", m.record.name, exc)
            with self._lock:
                m.state, m.error = "failed", str(exc)
                waiting = list(m.waiting)
                m.waiting.clear()
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
