"""Placement and loading of served models' chains (the inference engine's half that talks to nodes).

Protocol (coordinator side of ``InferenceStage.LoadStage``):

- ``_place`` asks swarm.scheduling.placement for chains over the online, not suspect nodes
  (their measured speed and memory, the link matrix with defaults for unmeasured links) and
  builds a :class:`~coordinator.inference.replica.Replica` per chain.
- ``_load_all`` / ``_load_replica`` send every stage its assignment (layers, next peer, codec of
  the hop, peers it may fetch its layers from) in parallel, each within ``LOAD_TIMEOUT_S``; a
  stage that fails to load marks its node suspect and fails the replica.
- A node fetches only its layers, from the coordinator or from a peer that holds them
  (``_peer_sources``); the hop's hidden-state codec follows the link (``_hop_codec``).

Mixed into :class:`coordinator.inference.engine.InferenceEngine`, whose state it uses.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import grpc

from swarm.errors import InfeasiblePlanError, UnavailableError
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.scheduling.placement import Links, PlacementDevice, PlacementRequest, place
from swarm.transport.channels import data_channel
from swarm.transport.errors import error_from_rpc

from coordinator.inference.replica import Replica
from coordinator.inference.sessions import StageRef
from coordinator.inference.routes import shared_split
from coordinator.inference.shape import model_shape

if TYPE_CHECKING:
    from coordinator.inference.engine import ServedModel

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0
DEFAULT_DELAY_S = 0.005  # unmeasured links: assume a LAN-ish hop
DEFAULT_BANDWIDTH_BPS = 125e6
AUTO_INT8_BELOW_BPS = 12.5e6  # 100 Mbit/s


class Placing:
    """Placement and loading for :class:`~coordinator.inference.engine.InferenceEngine`."""

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
                       predicted_latency_s=latency_s, checks=self.checks, verify_prob=p.verify_prob,
                       on_decode_step=self.memwatch.observer(model_shape(m.config, p)))

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
