"""The coordinator's InferenceGateway gRPC service: upload + serve, list, generate, shards.

Thin: validates and translates protobuf to the engine's calls. Uploading and unserving need the
coordinator's admin token (``swarm-api-token`` metadata); listing and generating the read or admin
token (listing without one on a ``--public-status`` coordinator: no stage placement; generating
never without one: it spends volunteers' compute). Errors map to status codes via
``grpc_errors`` (bad request -> INVALID_ARGUMENT, unknown model -> NOT_FOUND, no capacity ->
RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path

from swarm.errors import AuthError, InvalidRequestError, NotFoundError, SwarmError, UnavailableError, shown_as
from swarm.inference.session import TokenEvent
from swarm.model.checkpoint import check_weights, load_config
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.errors import grpc_errors
from swarm.transport.inference import sampling_from_pb
from swarm.transport.inference_shards import serve_shard

from coordinator.credentials import Access
from coordinator.inference.engine import InferenceEngine
from coordinator.inference.store import DEFAULT_VERIFY_PROB, ModelRecord, ModelStore, ServeParams, check_model_name

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 1 << 15
EVENT_TIMEOUT_S = 300.0


def model_info(engine: InferenceEngine, rec: ModelRecord, access: Access = Access.FULL) -> pb.ServeModelInfo:
    info = pb.ServeModelInfo(
        name=rec.name, digest=rec.digest, state=rec.state, created_at_s=rec.created_at_s,
        size_bytes=rec.size_bytes, error=rec.error, max_seq_len=rec.params.max_seq_len,
        verify_prob=rec.params.verify_prob, routes_enabled=rec.params.routes,
    )
    try:
        m = engine.get(rec.name)
    except NotFoundError:
        return info
    info.family = m.config.family
    info.num_layers = m.config.num_layers
    info.state = m.state
    info.error = m.error
    info.healthy_replicas, info.requested_replicas = engine.replica_count(m)
    info.healing = m.heal_note if info.healthy_replicas < info.requested_replicas else ""
    info.num_checks, info.num_check_failures, info.num_checks_void = m.num_checks, m.num_check_failures, m.num_checks_void
    info.num_referee_checks, info.num_referee_void = m.num_referee_checks, m.num_referee_void
    full = access is Access.FULL  # which node holds which layers, and where: read credentials only
    for r in list(m.replicas):
        info.replicas.append(pb.ServeReplicaInfo(
            replica=r.index, state=r.state, predicted_latency_s=r.predicted_latency_s,
            stages=[pb.ServeStageInfo(node_id=s.node_id if full else "", address=s.address if full else "",
                                      first_layer=s.first_layer, last_layer_excl=s.last_layer_excl, state=r.state)
                    for s in r.stages],
        ))
    if full:  # nodes of its chains on probation: every window they serve is checked (checks.py)
        info.probation_node_ids.extend(sorted(set(engine.checks.probation.of(m.chains_node_ids()))))
    engine.disagg.describe(m, info.disaggregation, full=full)
    for v in engine.routes.views(m):
        info.routes.append(pb.ServeRouteInfo(replicas=v["replicas"], node_ids=v["node_ids"] if full else [],
                                             sessions=v["sessions"], predicted_s_per_token=v["predicted_s_per_token"]))
    return info


def params_from_header(h: pb.ServeUploadHeader) -> ServeParams:
    # a client older than the modes sends only the bool: true is "on"; nothing is the default, "auto"
    mode = h.disaggregate_mode or ("on" if h.disaggregate else "auto")
    return ServeParams(
        num_replicas=h.num_replicas if h.num_replicas > 0 else None,
        num_stages=h.num_stages or None,
        max_seq_len=h.max_seq_len,  # 0: the model's context (resolved once the config is here)
        sessions_per_replica=h.sessions_per_replica or 8,
        objective=h.objective or "latency",
        hidden_codec=h.hidden_codec or "none",
        dtype=h.dtype or "float32",
        # --routes serves without spot checks unless they are asked for (then ServeParams refuses);
        # every --disaggregate mode keeps them (their replays ride on the prefill chains)
        verify_prob=(h.verify_prob if h.HasField("verify_prob")
                     else 0.0 if h.routes else DEFAULT_VERIFY_PROB),
        routes=h.routes,
        disaggregate=mode,
    )


def check_checkpoint(directory: Path) -> None:
    """Refuse an uploaded checkpoint whose config.json or safetensors headers cannot be read
    (INVALID_ARGUMENT naming the file), before nodes are asked to load it."""
    with shown_as(directory):
        load_config(directory)
        check_weights(directory)


class InferenceGatewayServicer(pb_grpc.InferenceGatewayServicer):
    def __init__(self, app, engine: InferenceEngine, store: ModelStore) -> None:
        self.app = app
        self.engine = engine
        self.store = store

    @grpc_errors
    def UploadModel(self, request_iterator, context) -> pb.ServeUploadReply:
        self.app.authenticate_user(context, "serving a model")
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidRequestError("an upload starts with a header naming the model and its files")
        h = first.header
        check_model_name(h.name)
        params = params_from_header(h)
        files = [(f.path, int(f.size_bytes), f.sha256) for f in h.files]

        def data():
            if first.data:
                yield first.path, first.data
            for msg in request_iterator:
                if msg.HasField("header"):
                    raise InvalidRequestError("an upload carries exactly one header")
                yield msg.path, msg.data

        directory, digest, size = self.store.receive(h.name, files, data(), check=check_checkpoint)
        rec = ModelRecord(name=h.name, digest=digest, dir=directory, params=params, state="placing", error="",
                          size_bytes=size, created_at_s=self.app.clock.time())
        self.store.put(rec)
        self.engine.serve(rec)
        return pb.ServeUploadReply(model=model_info(self.engine, self.store.get(h.name)))

    @grpc_errors
    def ListModels(self, request, context) -> pb.ServeListModelsReply:
        access = self.app.authorize_read(context)
        return pb.ServeListModelsReply(models=[model_info(self.engine, r, access) for r in self.store.all()])

    @grpc_errors
    def Unserve(self, request, context) -> pb.ServeUnserveReply:
        self.app.authenticate_user(context, "unserving a model")
        check_model_name(request.name)
        return pb.ServeUnserveReply(removed=self.engine.unserve(request.name))

    @grpc_errors
    def FetchShard(self, request, context) -> Iterator[pb.ServeShardChunk]:
        self.app.authenticate_node(context)
        m = self.engine.get(request.model_name)
        if request.model_digest != m.record.digest:
            raise NotFoundError(f"model {request.model_name!r} is now at another version; reload the stage")
        if not 0 <= request.first_layer < request.last_layer_excl <= m.config.num_layers:
            raise InvalidRequestError("shard layer range is outside the model")
        yield from serve_shard(m.record.dir, request)

    @grpc_errors
    def ConfirmAssignment(self, request, context) -> pb.ServeConfirmReply:
        node_id = self.app.authenticate_node(context)
        capability = self.engine.confirm(node_id, request.assignment)
        if capability is None:
            return pb.ServeConfirmReply(confirmed=False)
        a = request.assignment
        return pb.ServeConfirmReply(confirmed=True, step_capability=capability,
                                    commit_key=self.engine.checks.commit_key(a.model_name, node_id, a.stage))

    @grpc_errors
    def ConfirmShardFetch(self, request, context) -> pb.ServeConfirmFetchReply:
        self.app.authenticate_node(context)
        return pb.ServeConfirmFetchReply(allowed=self.engine.is_placed(request.node_id, request.model_name))

    @grpc_errors
    def Generate(self, request, context) -> Iterator[pb.ServeGenerateEvent]:
        if self.app.authorize_read(context) is not Access.FULL:
            raise AuthError("generating needs the coordinator's read or admin token (it uses volunteers' GPUs): pass "
                            "--token READ_TOKEN or set SWARM_TOKEN (read_token= in the READY line of "
                            "swarm-coordinator serve)")
        m = self.engine.get(request.model)
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequestError("send either prompt text or prompt_token_ids, not both")
        ids = list(request.prompt_token_ids) if request.prompt_token_ids else m.text.encode(request.prompt)
        if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidRequestError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
        params = sampling_from_pb(request.sampling, max_new_tokens=request.max_new_tokens, stop=tuple(request.stop))
        events: queue.Queue = queue.Queue()
        session = self.engine.submit(request.model, prompt_ids=ids, params=params, sink=events.put)
        context.add_callback(lambda: self.engine.cancel(session))
        first = True
        while True:
            try:
                ev = events.get(timeout=EVENT_TIMEOUT_S)
            except queue.Empty:
                self.engine.cancel(session)
                raise UnavailableError(f"no token for {EVENT_TIMEOUT_S:.0f} s; the swarm is stuck, retry later") from None
            if isinstance(ev, SwarmError):
                raise ev
            assert isinstance(ev, TokenEvent)
            out = pb.ServeGenerateEvent(token_ids=list(ev.token_ids), text=ev.text,
                                        finish_reason=ev.finish_reason or "")
            if first:
                out.num_prompt_tokens = len(ids)
                first = False
            if ev.finish_reason:
                out.num_replays = session.num_replays
                yield out
                return
            yield out
