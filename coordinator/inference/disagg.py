"""Disaggregated prefill and decode (``swarm serve --disaggregate {auto,on,off}``, HexGen-2 style).

Decision (:meth:`Disagg.place_if_chosen`, the pure rule in
:func:`swarm.scheduling.disaggregation.decide_disaggregation`): ``on`` places disaggregated;
``auto`` predicts on the candidate nodes and places disaggregated only when the options allow it
and the gain is at least AUTO_MIN_GAIN (a failed disaggregated placement then falls back to
colocated, saying so); otherwise the engine places colocated chains and ``swarm models`` shows the
prediction and why it was not applied.

Placement: the pure :func:`swarm.scheduling.disaggregation.plan_disaggregation` splits the
online nodes into prefill chains (the compute-richest nodes) and decode chains, and predicts the
gain over colocated chains on the same nodes (said in ``swarm models``, gain or not). The
prefill chains are placed by :func:`swarm.scheduling.placement.place` (layer split, stage order);
every decode chain takes the first prefill chain's layer ranges, its stage k on the decode node
with the fastest link from prefill stage k (:func:`pair_stages`). A decode stage's assignment
names the prefill nodes of its stage index (``kv_source_node_ids``): only they may send it KV.

Protocol of a session (coordinator side):
1. a new session joins the least-loaded prefill chain (when the decode chains have room for it,
   counting the sessions prefilling or moving) with a ``handoff``; the chain's step prefills
   it and samples its first token, which the client gets at once;
2. the prefill chain's driver detaches it (replica.py ``_hand_off``); here, on the engine's pool,
   every prefill stage k is asked (``PushKV``, with the prefill chain's capability) to send the
   session's cache of its layers to decode stage k (node/inference/kv_handoff.py; all stages at
   once), and the session joins the least-loaded decode chain at its prompt length: its next
   step there is a one-token decode;
3. a failed push (a prefill or decode node lost, a refusal) costs a replay, not an error: the
   session joins the decode chain at position 0 and re-prefills there (``num_handoff_failures``);
4. each stage's push answers with both ends' commitments (swarm/inference/kv_receipt.py: the
   prefill node's digest and sketch of what it sent, the decode node's signed receipt of what it
   took in), checked here (``check_handoff``). Two ends that disagree fail the hand-off as in 3
   (and both nodes are avoided for a while: one of them lies); an accepted one is kept on the
   session (``kv_receipts``), so that a spot check can tell whether a wrong decode output came
   from a wrong pushed cache (its pusher is to blame) or not (swarm/inference/verify.py ``judge``).
Without a ready prefill chain sessions go to a decode chain and prefill there (colocated);
without a ready decode chain the prefill chain serves them whole. A chain that fails follows the
engine's usual path (broken chain, healer; the repaired chain keeps its role by replica index).
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc

from swarm.errors import InfeasiblePlanError
from swarm.inference.kv_receipt import NONCE_BYTES, HandoffMismatch, PushedKV, check_handoff
from swarm.proto.v1 import inference_pb2 as pb
from swarm.scheduling.disaggregation import (DisaggPlan, Workload, auto_blocker, pair_stages,
                                              plan_disaggregation, pool_alike)
from swarm.scheduling.placement import PlacementDevice, PlacementRequest, place

from coordinator.inference.sessions import StageRef
from coordinator.inference.shape import model_shape

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 120.0


@dataclass(slots=True)
class _State:
    plan: DisaggPlan
    mode: str  # the served --disaggregate mode
    active: bool  # served disaggregated: roles, hand-offs (else only the prediction, for display)
    prefill: set[int] = field(default_factory=set)  # replica indices by role
    decode: set[int] = field(default_factory=set)
    moving: set = field(default_factory=set)  # sessions whose KV is being pushed
    kv_bytes_moved: int = 0
    num_handoffs: int = 0
    num_handoff_failures: int = 0


def assumed_workload(params) -> Workload:
    """The mix the prediction assumes (the coordinator does not know the real one): prompts of half
    the served context, responses of a sixteenth, ``--sessions`` decoding at once."""
    return Workload(prompt_tokens=max(1, params.max_seq_len // 2), response_tokens=max(1, params.max_seq_len // 16),
                    batch_sessions=params.sessions_per_replica)


class Disagg:
    """Decisions, roles, hand-offs and counters of disaggregated serving, per model."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._state: dict[str, _State] = {}
        self._lock = threading.Lock()
        self._push_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-push")

    # ------------------------------------------------------------------ placement
    def _plan(self, m, devices, *, num_stages: int) -> DisaggPlan:
        """The split of the ``--replicas`` (or as many as fit) chains' worth of compute-richest
        ``devices``, decided for ``m``'s mode and options."""
        e, p = self.engine, m.record.params
        chains = p.num_replicas or len(devices) // num_stages
        ranked = sorted(devices, key=lambda d: (-d.tflops, d.node_id))[:chains * num_stages]
        blocker = auto_blocker(routes=p.routes, num_replicas=p.num_replicas)
        mem_bw, models = self._measured(ranked)
        seen = ranked
        if p.disaggregate != "on":  # a decision to make: noise must not make it (on: roles by measured speed)
            seen, mem_bw = pool_alike(ranked, mem_bw, models)
        return plan_disaggregation(seen, e._links([d.node_id for d in seen]), model_shape(m.config, p),
                                   num_stages=num_stages, workload=assumed_workload(p), mode=p.disaggregate,
                                   blocker=blocker, mem_bandwidth_Bps=mem_bw)

    def _measured(self, devices) -> tuple[dict[str, float], dict[str, str]]:
        """The measured memory bandwidth of each of ``devices`` that reported one (bytes/s, as
        believed: ``NodeInfo.planning_mem_bandwidth_Bps``; the others are left to the model's
        default) and each one's device model (for :func:`pool_alike`)."""
        bws, models = {}, {}
        for d in devices:
            try:
                node = self.engine.app.registry.get(d.node_id)
            except Exception:  # noqa: BLE001 -- gone meanwhile: unmeasured
                continue
            if node.planning_mem_bandwidth_Bps:
                bws[d.node_id] = node.planning_mem_bandwidth_Bps
            models[d.node_id] = f"{node.hardware.device_kind}:{node.hardware.device_name}"
        return bws, models

    @staticmethod
    def _num_stages(p, devices) -> int:
        """Stages per chain when disaggregated: ``--stages``, else the candidates shared by 2+ chains."""
        return p.num_stages or max(1, len(devices) // max(2, p.num_replicas or 2))

    def place_if_chosen(self, m) -> bool:
        """Place ``m`` disaggregated when its mode is on, or auto and the prediction on the candidate
        nodes says so; False: the engine places colocated chains (the decision is recorded for
        `swarm models`, or :meth:`assess` records it once they are placed). Raises as :meth:`place`."""
        p = m.record.params
        self.forget(m.record.name)  # a re-upload of the same name decides afresh
        if p.disaggregate == "on":
            self.place(m)
            return True
        if p.disaggregate == "off" or auto_blocker(routes=p.routes, num_replicas=p.num_replicas):
            return False
        _, devices = self.engine._candidates(m, exclude=set())
        plan = self._plan(m, devices, num_stages=self._num_stages(p, devices))
        if plan.enabled:
            try:
                self.place(m, plan)
                return True
            except InfeasiblePlanError as exc:
                if m.replicas or m.loading:  # chains were started: not a clean fallback
                    raise
                plan = replace(plan, enabled=False, reason=f"auto: the disaggregated placement failed ({exc}); "
                               f"served colocated; {plan.reason}")
        with self._lock:
            self._state[m.record.name] = _State(plan=plan, mode=p.disaggregate, active=False)
        return False

    def assess(self, m) -> None:
        """Record what disaggregating ``m`` would give on its nodes (for `swarm models`; not applied),
        unless :meth:`place_if_chosen` recorded its auto decision already."""
        chains = [r for r in m.replicas if r.state == "ready"]
        with self._lock:
            decided = m.record.name in self._state
        if not chains or decided:
            return
        by_id = {n.id: n for n in self.engine.app.registry.online()}
        used = sorted({nid for r in chains for nid in r.node_ids} & set(by_id))
        devices = [PlacementDevice(node_id=i, tflops=max(by_id[i].planning_tflops, 1e-6), memory_bytes=0) for i in used]
        try:
            plan = self._plan(m, devices, num_stages=len(chains[0].stages))
        except Exception:  # noqa: BLE001 -- a prediction for display must never fail serving
            log.debug("disaggregation assessment failed", exc_info=True)
            return
        assert not plan.enabled, "off or blocked: place_if_chosen placed the others"
        with self._lock:
            self._state[m.record.name] = _State(plan=plan, mode=m.record.params.disaggregate, active=False)

    def place(self, m, plan: DisaggPlan | None = None) -> None:
        """Place and load ``m``'s prefill and decode chains, by ``plan`` (decided on the current
        candidates) or a new one (raises InfeasiblePlanError / UnavailableError)."""
        e, p = self.engine, m.record.params
        nodes, devices = e._candidates(m, exclude=set())
        K = self._num_stages(p, devices)
        if plan is None or not set(plan.prefill_nodes + plan.decode_nodes) <= {d.node_id for d in devices}:
            plan = self._plan(m, devices, num_stages=K)  # none yet, or a planned node left meanwhile
        if not plan.enabled:
            raise InfeasiblePlanError(f"the nodes changed while placing and no longer favour disaggregating: "
                                      f"{plan.reason}")
        by_id = {n.id: n for n in nodes}
        dev = {d.node_id: d for d in devices}
        pre_ids = plan.prefill_nodes
        placement = place([dev[i] for i in sorted(pre_ids)], e._links(sorted(pre_ids)), model_shape(m.config, p),
                          PlacementRequest(num_replicas=len(plan.prefill_chains), num_stages=K, max_seq_len=p.max_seq_len,
                                           sessions_per_replica=p.sessions_per_replica, objective=p.objective))
        split = [(s.first_layer, s.last_layer_excl) for s in placement.replicas[0].stages]
        pre_chains = [[s.node_id for s in rp.stages] for rp in placement.replicas]
        if any(len(c) != K for c in pre_chains):
            raise InfeasiblePlanError(f"the prefill nodes could not hold {K} stage(s) each; lower --stages")
        all_ids = sorted(set(pre_ids) | set(plan.decode_nodes))
        idx = {n: i for i, n in enumerate(all_ids)}
        link_bw = e._links(all_ids).bandwidth_Bps
        dec_chains, rest = [], list(plan.decode_nodes)
        for i in range(len(plan.decode_chains)):
            chain = pair_stages(pre_chains[i % len(pre_chains)], rest, lambda a, b: link_bw[idx[a]][idx[b]])
            rest = [n for n in rest if n not in chain]
            dec_chains.append(list(chain))
        final = DisaggPlan(enabled=True, prefill_chains=tuple(tuple(c) for c in pre_chains),
                           decode_chains=tuple(tuple(c) for c in dec_chains), predicted_gain=plan.predicted_gain,
                           predicted_tbt_p99_ratio=plan.predicted_tbt_p99_ratio, reason=plan.reason)
        st = _State(plan=final, mode=p.disaggregate, active=True)
        with self._lock:
            self._state[m.record.name] = st
        replicas = []
        latency = placement.replicas[0].latency_s  # the prefill chain's predicted time per token (same split)
        for role, chains in (("prefill", pre_chains), ("decode", dec_chains)):
            for chain in chains:
                with e._lock:
                    index = m.next_replica
                    m.next_replica += 1
                (st.prefill if role == "prefill" else st.decode).add(index)
                refs = [_ref(by_id[n], a, b) for n, (a, b) in zip(chain, split)]
                replicas.append(e._new_replica(m, index, refs, latency))
        log.info("disaggregated model=%s prefill=%s decode=%s: %s", m.record.name,
                 [[n[:8] for n in c] for c in pre_chains], [[n[:8] for n in c] for c in dec_chains], final.reason)
        e._load_all(m, replicas)

    def prefill_indices(self, m) -> set[int]:
        """Replica indices of ``m``'s prefill chains while it is served disaggregated (else empty):
        spot checks replay on them first (checks.py)."""
        with self._lock:
            st = self._state.get(m.record.name)
            return set(st.prefill) if st is not None and st.active else set()

    def kv_sources(self, m, replica, stage: int) -> list[str]:
        """The nodes that may send stage ``stage`` of ``replica`` KV caches: for a decode chain, the
        prefill chains' nodes of that stage; none otherwise."""
        with self._lock:
            st = self._state.get(m.record.name)
        if st is None or not st.active or replica.index not in st.decode:
            return []
        return sorted({c[stage] for c in st.plan.prefill_chains if stage < len(c)})

    # ------------------------------------------------------------------ sessions
    def pump(self, m) -> bool:
        """Attach ``m``'s waiting sessions (under the engine's lock); False when ``m`` is not
        disaggregated or has no chain of either role ready (the engine's own pump then)."""
        with self._lock:
            st = self._state.get(m.record.name)
        if st is None or not st.active:
            return False
        pre = [r for r in m.replicas if r.index in st.prefill and r.state == "ready"]
        dec = [r for r in m.replicas if r.index in st.decode and r.state == "ready"]
        if not pre and not dec:
            return False
        while m.waiting:
            s = m.waiting[0]
            if s.cancelled:
                m.waiting.popleft()
                continue
            if pre and dec:
                room = sum(r.max_sessions - r.num_sessions for r in dec) - sum(r.num_sessions for r in pre) - len(st.moving)
                target = [r for r in pre if r.has_room()] if room > 0 else []
            else:  # one role left: it serves whole sessions
                target = [r for r in pre or dec if r.has_room()]
            if not target:
                return True
            m.waiting.popleft()
            s.handoff = self._handoff if pre and dec else None
            min(target, key=lambda r: (r.num_sessions, r.index)).attach(s)
        return True

    def _handoff(self, replica, s) -> None:
        """The prefill chain ``replica`` detached ``s`` after its prefill: move its KV (on a pool)."""
        with self._lock:
            st = self._state.get(replica.model)
            if st is not None:
                st.moving.add(s)
        self.engine._pool.submit(self._move, replica, s)

    def _move(self, replica, s) -> None:
        e = self.engine
        m = e._models.get(replica.model)
        with self._lock:
            st = self._state.get(replica.model)
        try:
            if m is None or st is None:
                return
            dec = [r for r in m.replicas if r.index in st.decode and r.state == "ready"]
            # a slot held on the decode chain while the KV moves: its stages hold the session before
            # it attaches, and a check replay riding there meanwhile must not take that slot
            target = next((r for r in sorted(dec, key=lambda r: (r.num_sessions, r.index)) if r.reserve()), None)
            if target is None:  # nowhere to decode (or no room left there): replay whole through the queue
                replica._drop(s)
                self._requeue(m, s)
                return
            try:
                try:
                    moved, receipts = self._push(replica, target, s)
                except (grpc.RpcError, HandoffMismatch) as exc:
                    if isinstance(exc, HandoffMismatch):  # one end lies (or is broken): which, nobody can tell
                        why = str(exc)
                        for node_id in {x.node_id for x in replica.stages + target.stages}:
                            e.suspect(node_id)
                    else:
                        why = f"{exc.code().name}: {exc.details()}"
                    log.warning("KV hand-off of session %s failed (%s); it replays on replica %d", s.id[:8], why,
                                target.index)
                    st.num_handoff_failures += 1
                    replica._drop(s)  # its prefill caches are closed in that chain's next step
                    s.kv_pos = 0
                    s.num_replays += 1
                    s.kv_receipts = ()
                else:
                    st.kv_bytes_moved += moved
                    st.num_handoffs += 1
                    s.kv_pushed = s.kv_pos > 0  # (0: its prefill was judged wrong meanwhile: replay)
                    s.kv_receipts = receipts if s.kv_pushed else ()
                if s.closed:
                    return
                target.attach(s)  # (cancelled meanwhile: its driver closes it on the decode stages)
            finally:
                target.unreserve()  # attached, the session itself holds the slot
            target.release(s, None)  # tokens whose check concluded while the KV moved
        finally:
            if st is not None:
                with self._lock:
                    st.moving.discard(s)
            if m is not None:
                e._pump(m)

    def _push(self, replica, target, s) -> tuple[int, tuple[PushedKV, ...]]:
        """Ask every prefill stage of ``replica`` at once to push ``s``'s cache to ``target``'s
        matching stage; returns the bytes moved and each stage's accepted hand-off (both ends'
        commitments checked: swarm/inference/kv_receipt.py). Raises grpc.RpcError, or
        HandoffMismatch when the two ends of a stage disagree on what moved."""
        positions = s.kv_pos
        nonce = secrets.token_bytes(NONCE_BYTES)  # this hand-off's: every receipt must be signed for it

        def one(k: int) -> pb.ServePushKVReply:
            st = target.stages[k]
            req = pb.ServePushKVRequest(
                model_name=replica.model, replica=replica.index, session_id=s.id, num_positions=positions,
                target=pb.ServeRouteHop(replica=target.index, node_id=st.node_id, address=st.address,
                                        capability=target.capability), handoff_nonce=nonce)
            return replica.calls.push_kv(k, req, timeout_s=PUSH_TIMEOUT_S)
        futures = [self._push_pool.submit(one, k) for k in range(len(replica.stages))]
        replies = [f.result() for f in futures]
        records = []
        for k, reply in enumerate(replies):
            src, dst = replica.stages[k].node_id, target.stages[k].node_id
            try:
                key = self.engine.app.registry.public_key(dst)
            except Exception:  # noqa: BLE001 -- gone from the registry meanwhile: nothing to verify with
                key = b""
            r = reply.receipt
            records.append(check_handoff(
                model=replica.model, decode_replica=target.index, stage=k, session_id=s.id, positions=positions,
                nonce=nonce, prefill_node=src, decode_node=dst, decode_public_key=key, sent_digest=reply.sent_digest,
                sent_sketch=reply.sent_sketch, receipt_digest=r.digest, receipt_sketch=r.sketch,
                receipt_positions=r.positions, signature=r.signature))
        return sum(int(r.kv_bytes) for r in replies), tuple(records)

    def replay(self, m, s) -> None:
        """A handed-off session whose prefill a spot check found wrong: its decode caches began with
        that KV, so it leaves its decode chain and replays from its released tokens (on the queue;
        while its KV is still moving, the decode chain prefills it afresh)."""
        holder = s.replica
        if holder is not None:
            holder._drop(s)  # its caches there are closed in that chain's next step
        with self.engine._lock:
            s.pending = []  # held tokens are dropped: the replay computes them again
            s.kv_pushed = False
            s.kv_receipts = ()
            if holder is None:
                s.kv_pos = 0
                return
        if not s.closed:
            self._requeue(m, s)
            self.engine._pump(m)

    def _requeue(self, m, s) -> None:
        """Back to the queue: the session replays from its released tokens. What it held for a
        check is dropped (the replay computes it again), as after a failed chain: kept, a check
        concluding meanwhile could only flag it released (no chain to flush it), and the pending
        token, counted towards max_new_tokens, left the session never runnable once attached."""
        e = self.engine
        with e._lock:
            s.kv_pos, s.replica = 0, None
            s.pending = []
            s.num_replays += 1
            s.waiting_since_s = e.app.clock.monotonic()
            m.waiting.appendleft(s)

    # ------------------------------------------------------------------ views
    def describe(self, m, info: pb.ServeDisaggInfo, *, full: bool) -> None:
        """Fill ``info`` (``swarm models --json``'s ``disaggregation``); node ids only with ``full``."""
        with self._lock:
            st = self._state.get(m.record.name)
        if st is None:
            return
        plan = st.plan
        info.enabled = st.active
        info.requested = st.mode == "on"
        info.mode = st.mode
        if full:
            info.prefill_nodes.extend(plan.prefill_nodes)
            info.decode_nodes.extend(plan.decode_nodes)
        info.predicted_gain = plan.predicted_gain
        info.predicted_tbt_p99_ratio = plan.predicted_tbt_p99_ratio
        info.reason = plan.reason
        info.kv_bytes_moved, info.num_handoffs = st.kv_bytes_moved, st.num_handoffs
        info.num_handoff_failures = st.num_handoff_failures

    def forget(self, name: str) -> None:
        with self._lock:
            self._state.pop(name, None)


def _ref(node, first: int, last: int) -> StageRef:
    return StageRef(node_id=node.id, address=node.peer_address, first_layer=first, last_layer_excl=last)
