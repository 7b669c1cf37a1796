"""The node's inference stage service: load a layer range, run session steps, forward hidden states.

Protocol this participant follows (see protos/swarm/proto/v1/inference.proto):

- ``LoadStage``: the coordinator assigns (model, replica, stage, layers, next peer). The node
  fetches only the tensors of those layers (from the coordinator's ``FetchShard``, or from a
  peer's), writes them as a stage-only safetensors checkpoint in its state dir, builds the
  stage and answers. A later assignment for the same (model, replica) replaces it; when it asks
  for the very layers this node holds for that (model, replica) (a chain repaired around a lost
  node), the loaded weights are kept and nothing is fetched.
- ``StepStream`` (and ``Step``, the same step as one unary call): run the entries on this stage
  (its KV caches); unless last, send the step with the packed hidden states on to the next
  stage and return its reply; the last stage samples. Each incoming stream gets its own
  persistent link (swarm/transport/step_link.py) to the next stage, opened on its first step
  and closed with it, so a hop costs one message each way. A step may carry a per-request
  route (``route``: one hop per stage, coordinator/inference/routes.py): the stage must be the
  route's hop for its stage index, and forwards to the route's next hop (its replica, node,
  address, and that chain's step capability as metadata; TLS checks the node's certificate)
  instead of its chain's next stage. An entry with ``replay_stages`` = k+1 is a reset prefill
  only up to stage k, which sends on the entry's last position alone, as a one-token decode.
  Every field from the network is
  validated, every step of a stream is authorized as a unary Step is; a bad step fails only
  its call (a stream ends with the status, and the caller opens a new one).
- Authentication: LoadStage is accepted only once the coordinator confirms the assignment over
  the node's authenticated session; its reply carries the chain's step capability. Step,
  CloseSession and UnloadStage of a loaded stage must carry that capability as gRPC metadata
  (``swarm-step-capability``, compared in constant time); others get UNAUTHENTICATED (none)
  or PERMISSION_DENIED (wrong). This stage forwards it on its Step to the next stage.
- ``CloseSession`` frees caches; idle sessions expire after the assignment's timeout.
- ``FetchShard``: serve the tensors this node holds to a peer that is loading the same layers.
- Who may call (caller from its TLS certificate, ``identify(context)``; checked before anything
  else, PERMISSION_DENIED otherwise): LoadStage / UnloadStage only the coordinator; Step /
  StepStream / CloseSession only the coordinator or the chain's previous stage (``prev_node_id`` of the
  assignment, or the previous hop of the step's route, which only the coordinator's capability
  holders can send; the step capability stays as defence in depth); FetchShard the coordinator or a
  node the coordinator confirms holds an assignment of that model (``confirm_fetch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.certs import COORDINATOR
from swarm.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from swarm.faults import NO_FAULTS, FaultConfig, FaultInjector
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_stage
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.errors import grpc_errors
from swarm.transport.step_link import StepLink
from swarm.transport.spin import spin_setting
from swarm.transport.lazy_channels import RenewingStub
from swarm.transport.inference import check_step_capability

from swarm.transport.kv import kv_target

from node.inference.kv_handoff import import_kv, push_kv
from node.inference.routing import PeerStubs, forward_unary, next_link, route_hop
from node.inference.step import StepRunner
from node.inference.shards import fetch_shard, safe_dir, same_weights, serve_shard, validate_assignment

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 120.0
DTYPES = {"": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class _Loaded:
    assignment: pb.ServeStageAssignment
    runtime: StageRuntime
    shard_dir: Path
    next_stubs: RenewingStub | None  # to the next stage (TLS, rebuilt after a certificate renewal)
    capability: str  # the chain's step capability; "" only without a coordinator (tests)
    commit_key: bytes = b""  # authenticates this stage's commitments (commit_sig.py); b"": it signs them


class InferenceStageServicer(pb_grpc.InferenceStageServicer):
    """Holds this node's loaded stages, keyed by (model name, replica)."""

    def __init__(
        self,
        *,
        node_id: str,
        device: str,
        state_dir: Path,
        open_coordinator_shard: Callable[[pb.ServeFetchShardRequest], Iterator[pb.ServeShardChunk]],
        on_change: Callable[[dict], None] | None = None,
        confirm: Callable[[pb.ServeStageAssignment], tuple[str, bytes] | None] | None = None,
        traffic=None,
        security=None,
        identify: Callable[[object], str] | None = None,
        confirm_fetch: Callable[[str, str], bool] | None = None,
        faults: FaultConfig = NO_FAULTS,
        sign: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``confirm`` asks the coordinator whether it issued an assignment and returns (the
        chain's step capability, this stage's commit key) (None: not issued). Without ``confirm``
        (tests without a coordinator) assignments are trusted and stage calls need no capability.
        ``security`` (swarm.transport.tls): channels to peers; ``identify(context)``: the caller
        from its certificate (None: callers are not checked -- tests without a coordinator);
        ``confirm_fetch(node_id, model)``: whether the coordinator placed that node on that model.
        ``faults``: SWARM_FAULT (tests only): ``wrong-tokens=P`` alters the output of a fraction P
        of the steps this node serves, ``corrupt-kv=P`` a fraction P of the KV caches it pushes
        (swarm/faults.py). ``sign``: signs with this node's identity key (the KV hand-off receipts
        of node/inference/kv_handoff.py; None: unsigned, tests without a coordinator)."""
        self.security = security
        self._sign = sign
        injector = FaultInjector(faults) if faults.corrupt_kv > 0 else None
        self._alter_kv = (lambda kv: injector.perturb(kv, faults.corrupt_kv)) if injector is not None else None
        self._identify = identify
        self._confirm_fetch = confirm_fetch
        self.node_id = node_id
        self.wire = None  # the step wire (swarm/transport/step_wire.py) once the plugin started it
        self.device = device
        self.spin_s = spin_setting(device)  # step-wire reads busy-poll this long (swarm/transport/spin.py)
        self.state_dir = Path(state_dir) / "inference"
        self._open_coordinator_shard = open_coordinator_shard
        self._on_change = on_change
        self._confirm = confirm
        self.traffic = traffic  # node.traffic.Traffic or None: peer bytes (hidden states, shards)
        self._stages: dict[tuple[str, int], _Loaded] = {}
        self._peers = PeerStubs(security)  # to other chains' stages, for per-request routes
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._runner = StepRunner(node_id=node_id, traffic=traffic, faults=faults, sign=sign)

    # ------------------------------------------------------------------ helpers
    def _get(self, model: str, replica: int) -> _Loaded:
        with self._lock:
            loaded = self._stages.get((model, replica))
        if loaded is None:
            raise NotFoundError(
                f"node {self.node_id[:12]} serves no stage of model {model!r} replica {replica}; "
                "the coordinator must (re)assign it"
            )
        return loaded

    def _caller(self, context) -> str | None:
        return self._identify(context) if self._identify is not None else None

    def _only_coordinator(self, context, method: str) -> None:
        caller = self._caller(context)
        if caller is not None and caller != COORDINATOR:
            raise PermissionDeniedError(f"{method} on node {self.node_id[:12]} is for the coordinator only, "
                                        f"not node {caller[:12]}")

    def _only_chain(self, loaded: _Loaded, caller: str | None, method: str,
                    request: pb.ServeStepRequest | None = None) -> None:
        """The coordinator, or the node of the previous stage of this chain or of the step's
        route (``caller``: from :meth:`_caller`)."""
        a = loaded.assignment
        if caller is None or caller == COORDINATOR or (a.stage > 0 and caller == a.prev_node_id):
            return
        if request is not None and a.stage > 0 and len(request.route) == a.num_stages \
                and caller == request.route[a.stage - 1].node_id:
            return
        raise PermissionDeniedError(
            f"{method} on model {a.model_name!r} replica {a.replica} stage {a.stage}: node {caller[:12]} is not the "
            "previous stage of this chain; clients go through the coordinator's Generate")

    def _authorize(self, loaded: _Loaded, context, method: str) -> None:
        """Raise unless the call carries the capability of this stage's chain."""
        if not loaded.capability:
            return  # no coordinator (tests): assignments and calls are trusted
        a = loaded.assignment
        check_step_capability(
            context, loaded.capability,
            what=f"{method} on model {a.model_name!r} replica {a.replica} stage {a.stage} (node {self.node_id[:12]})",
        )

    def metrics(self) -> dict:
        with self._lock:
            stages = [
                {"model": k[0], "replica": k[1], "stage": v.assignment.stage,
                 "layers": [v.assignment.first_layer, v.assignment.last_layer_excl],
                 "sessions": v.runtime.num_sessions, **v.runtime.graph_stats}
                for k, v in self._stages.items()
            ]
        wire = self.wire
        return {"inference_stages": stages, "inference_steps": self._runner.steps,
                "inference_tokens": self._runner.tokens, "step_wire_port": wire.port if wire is not None else 0,
                "step_wire_steps": wire.steps if wire is not None else 0}

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.metrics())
            except Exception:  # noqa: BLE001 -- metrics are best effort
                log.debug("metrics update failed", exc_info=True)

    def expire_sessions(self) -> int:
        with self._lock:
            loaded = list(self._stages.values())
        return sum(len(l.runtime.expire()) for l in loaded)

    def close_all(self) -> None:
        with self._lock:
            stages, self._stages = list(self._stages.values()), {}
        for l in stages:
            if l.next_stubs is not None:
                l.next_stubs.close()
        self._peers.close()

    def _next_hop(self, loaded: _Loaded, request: pb.ServeStepRequest) -> tuple | None:
        """Where this step goes next: (stubs, capability, replica, node id, address), or None on
        the last stage (node/inference/routing.py validates a route)."""
        a = loaded.assignment
        if a.stage == a.num_stages - 1:
            return None
        hop = route_hop(a, request, self.node_id)
        if hop is None or (hop.replica, hop.node_id, hop.address) == (a.replica, a.next_node_id, a.next_address):
            assert loaded.next_stubs is not None
            cap = hop.capability if hop is not None and hop.capability else loaded.capability
            return loaded.next_stubs, cap, a.replica, a.next_node_id, a.next_address
        return self._peers.get(hop.node_id, hop.address), hop.capability, hop.replica, hop.node_id, hop.address

    # ------------------------------------------------------------------ RPCs
    @grpc_errors
    def LoadStage(self, request: pb.ServeLoadStageRequest, context) -> pb.ServeLoadStageReply:
        self._only_coordinator(context, "LoadStage")
        a = request.assignment
        validate_assignment(a)
        if a.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype {a.dtype!r} unsupported; use float32, float16 or bfloat16")
        capability, commit_key = "", b""
        if self._confirm is not None:
            capability, commit_key = self._confirm(a) or ("", b"")
            if not capability:
                raise PermissionDeniedError(
                    f"the coordinator did not issue this assignment (model {a.model_name!r} replica {a.replica} "
                    f"stage {a.stage}) to node {self.node_id[:12]}; refusing it")
        t0 = time.monotonic()
        with self._lock:
            held = self._stages.get((a.model_name, a.replica))
        if held is not None and same_weights(held.assignment, a):
            return self._relink(a, held, capability, commit_key, t0)
        with self._load_lock:  # one load at a time: bounded memory and disk use
            shard_dir = self.state_dir / safe_dir(a.model_name) / f"{a.model_digest[:16]}-{a.first_layer}-{a.last_layer_excl}"
            fetch = pb.ServeFetchShardRequest(
                model_name=a.model_name,
                model_digest=a.model_digest,
                first_layer=a.first_layer,
                last_layer_excl=a.last_layer_excl,
                include_embeddings=a.stage == 0,
                include_head=a.stage == a.num_stages - 1,
            )
            ids = list(a.shard_source_node_ids) if len(a.shard_source_node_ids) == len(a.shard_sources) else []
            nbytes = fetch_shard(fetch, list(a.shard_sources) or ["coordinator"], shard_dir,
                                 open_coordinator_shard=self._open_coordinator_shard, security=self.security,
                                 traffic=self.traffic, node_ids=ids)
            dtype = DTYPES[a.dtype]
            stage = load_stage(
                shard_dir, a.first_layer, a.last_layer_excl,
                is_first=a.stage == 0, is_last=a.stage == a.num_stages - 1, device=self.device, dtype=dtype,
            )
            if stage.config.num_layers < a.last_layer_excl:
                raise InvalidRequestError("assignment layer range is outside the model")
            runtime = StageRuntime(
                stage, max_seq_len=a.max_seq_len, max_sessions=a.max_sessions,
                session_timeout_s=a.session_timeout_s or 300.0,
            )
            next_stubs = None
            if a.next_address:
                next_stubs = RenewingStub(
                    lambda: data_channel(a.next_address, security=self.security, node_id=a.next_node_id or None),
                    pb_grpc.InferenceStageStub, self.security)
            loaded = _Loaded(assignment=a, runtime=runtime, shard_dir=shard_dir, next_stubs=next_stubs,
                             capability=capability, commit_key=commit_key)
            with self._lock:
                old = self._stages.get((a.model_name, a.replica))
                self._stages[(a.model_name, a.replica)] = loaded
            if old is not None and old.next_stubs is not None:
                old.next_stubs.close()
        dt = time.monotonic() - t0
        log.info("loaded stage model=%s replica=%d stage=%d/%d layers=[%d,%d) bytes=%d load_s=%.2f device=%s",
                 a.model_name, a.replica, a.stage, a.num_stages, a.first_layer, a.last_layer_excl, nbytes, dt, self.device)
        self._changed()
        return pb.ServeLoadStageReply(node_id=self.node_id, loaded_bytes=nbytes, load_s=dt)

    def _relink(self, a: pb.ServeStageAssignment, held: _Loaded, capability: str, commit_key: bytes,
                t0: float) -> pb.ServeLoadStageReply:
        """Take a new assignment for the layers already loaded: new neighbours and capability,
        same weights and runtime (sessions replay with reset entries)."""
        next_stubs = None
        if a.next_address:
            next_stubs = RenewingStub(
                lambda: data_channel(a.next_address, security=self.security, node_id=a.next_node_id or None),
                pb_grpc.InferenceStageStub, self.security)
        loaded = _Loaded(assignment=a, runtime=held.runtime, shard_dir=held.shard_dir, next_stubs=next_stubs,
                         capability=capability, commit_key=commit_key)
        with self._lock:
            self._stages[(a.model_name, a.replica)] = loaded
        if held.next_stubs is not None:
            held.next_stubs.close()
        dt = time.monotonic() - t0
        log.info("relinked stage model=%s replica=%d stage=%d/%d layers=[%d,%d) (weights kept) load_s=%.3f",
                 a.model_name, a.replica, a.stage, a.num_stages, a.first_layer, a.last_layer_excl, dt)
        self._changed()
        return pb.ServeLoadStageReply(node_id=self.node_id, loaded_bytes=0, load_s=dt)

    @grpc_errors
    def UnloadStage(self, request: pb.ServeUnloadStageRequest, context) -> pb.ServeUnloadStageReply:
        self._only_coordinator(context, "UnloadStage")
        with self._lock:
            old = self._stages.get((request.model_name, request.replica))
            if old is not None:
                self._authorize(old, context, "UnloadStage")
                self._stages.pop((request.model_name, request.replica), None)
        if old is not None and old.next_stubs is not None:
            old.next_stubs.close()
        self._changed()
        return pb.ServeUnloadStageReply(unloaded=old is not None)

    @grpc_errors
    def Step(self, request: pb.ServeStepRequest, context) -> pb.ServeStepReply:
        loaded = self._get(request.model_name, request.replica)
        self._only_chain(loaded, self._caller(context), "Step", request)
        self._authorize(loaded, context, "Step")
        hop = self._next_hop(loaded, request)
        return self._step(loaded, request, lambda nxt: forward_unary(hop, nxt, timeout_s=STEP_TIMEOUT_S), hop)

    @grpc_errors
    def StepStream(self, request_iterator, context) -> Iterator[pb.ServeStepReply]:
        """Steps on one persistent stream; each is checked and run exactly as a unary Step, and
        forwarded on this stream's own link to the next stage, opened on its first step."""
        caller = self._caller(context)  # from the TLS certificate: the same for the whole stream
        link: StepLink | None = None
        linked: tuple | None = None  # (stage, next hop) the link was opened for
        try:
            for request in request_iterator:
                loaded = self._get(request.model_name, request.replica)
                self._only_chain(loaded, caller, "StepStream", request)
                self._authorize(loaded, context, "StepStream")  # a reloaded stage has a new capability
                hop = self._next_hop(loaded, request)
                if hop is not None and (linked is None or linked[0] is not loaded or linked[1] != hop):
                    if link is not None:
                        link.close()
                    link, linked = next_link(self.security, loaded.assignment.stage + 1, hop,
                                             spin_s=self.spin_s), (loaded, hop)
                yield self._step(loaded, request, lambda nxt: link.step(nxt, timeout_s=STEP_TIMEOUT_S),  # noqa: B023
                                 hop, raw_ok=link is not None and link.raw_hidden)  # (called at once)
        finally:
            if link is not None:
                link.close()

    @grpc_errors
    def StepWire(self, request: pb.ServeStepWireRequest, context) -> pb.ServeStepWireReply:
        """The port of this node's step wire (0: none); any swarm certificate may ask."""
        self._caller(context)
        return pb.ServeStepWireReply(port=self.wire.port if self.wire is not None else 0, raw_hidden=True)


    def _step(self, loaded: _Loaded, request: pb.ServeStepRequest,
              forward: Callable[[pb.ServeStepRequest], pb.ServeStepReply], hop: tuple | None, *,
              raw_ok: bool = False) -> pb.ServeStepReply:
        """Run one step on this stage and forward it (node/inference/step.py); ``raw_ok``: the
        next stage reads raw hidden states."""
        return self._runner.step(loaded.assignment, loaded.runtime, request, forward, hop,
                                 commit_key=loaded.commit_key, raw_ok=raw_ok)

    @grpc_errors
    def CloseSession(self, request: pb.ServeCloseSessionRequest, context) -> pb.ServeCloseSessionReply:
        if len(request.session_ids) > 4096:
            raise InvalidRequestError("close at most 4096 sessions per call")
        with self._lock:
            loaded = self._stages.get((request.model_name, request.replica))
        if loaded is None:
            return pb.ServeCloseSessionReply(num_closed=0)
        self._only_chain(loaded, self._caller(context), "CloseSession")
        self._authorize(loaded, context, "CloseSession")
        n = loaded.runtime.close(list(request.session_ids))
        return pb.ServeCloseSessionReply(num_closed=n)

    @grpc_errors
    def PushKV(self, request: pb.ServePushKVRequest, context) -> pb.ServePushKVReply:
        """Disaggregated serving: send a prefilled session's cache on (node/inference/kv_handoff.py)."""
        self._only_coordinator(context, "PushKV")
        loaded = self._get(request.model_name, request.replica)
        self._authorize(loaded, context, "PushKV")
        reply = push_kv(loaded.runtime, loaded.assignment, request, node_id=self.node_id, peers=self._peers,
                        alter=self._alter_kv)
        if self.traffic is not None:
            self.traffic.add_sent(reply.kv_bytes)
        return reply

    @grpc_errors
    def ImportKV(self, request_iterator, context) -> pb.ServeImportKVReply:
        """Disaggregated serving: take a session's cache from a prefill node named in the assignment."""
        caller = self._caller(context)
        first = next(request_iterator, None)
        loaded = self._get(*kv_target(first))
        if caller == COORDINATOR:
            raise PermissionDeniedError("ImportKV is for the prefill nodes the coordinator named, not the coordinator")
        self._authorize(loaded, context, "ImportKV")
        reply = import_kv(loaded.runtime, loaded.assignment, first, request_iterator, caller=caller, sign=self._sign)
        if self.traffic is not None:
            self.traffic.add_received(reply.kv_bytes)
        return reply

    @grpc_errors
    def FetchShard(self, request: pb.ServeFetchShardRequest, context) -> Iterator[pb.ServeShardChunk]:
        caller = self._caller(context)
        if caller is not None and caller != COORDINATOR:
            if self._confirm_fetch is None or not self._confirm_fetch(caller, request.model_name[:128]):
                raise PermissionDeniedError(f"node {caller[:12]} holds no assignment of model "
                                            f"{request.model_name[:80]!r}; only its stages may fetch its shards")
        with self._lock:
            held = [l for (m, _), l in self._stages.items() if m == request.model_name]
        for l in held:
            a = l.assignment
            if (a.model_digest == request.model_digest and a.first_layer <= request.first_layer
                    and request.last_layer_excl <= a.last_layer_excl
                    and (not request.include_embeddings or a.stage == 0)
                    and (not request.include_head or a.stage == a.num_stages - 1)):
                for chunk in serve_shard(l.shard_dir, request):
                    if self.traffic is not None:
                        self.traffic.add_sent(chunk.ByteSize())
                    yield chunk
                return
        raise NotFoundError(f"this node holds no copy of layers [{request.first_layer}, {request.last_layer_excl}) "
                            f"of {request.model_name!r}; fetch them from the coordinator")

