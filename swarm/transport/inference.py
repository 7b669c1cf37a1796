"""Inference messages on the wire: step entries, hidden states, and the gateway's client.

Servicers (node/inference, coordinator/inference) and the CLI use these helpers so that
protobuf stays here; everything past them sees :class:`StepEntry`, tensors and dicts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.errors import AuthError, InvalidRequestError, PermissionDeniedError
from swarm.inference.codec import check_codec, int8_decode, int8_encode
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StepEntry
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport import tensors as wire
from swarm.transport.auth import api_token_metadata
from swarm.transport.channels import CHUNK_BYTES, control_channel, parse_address
from swarm.transport.errors import translate_rpc_errors

log = logging.getLogger(__name__)

MAX_ENTRIES = 1024
MAX_TOKENS_PER_STEP = 1 << 16
UPLOAD_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
MAX_UPLOAD_FILES = 256


# ----------------------------------------------------------------------------- step capability
# Stage calls (Step, CloseSession, UnloadStage) carry the chain's secret in this metadata key.
# The coordinator makes one per replica, hands it to each stage in its ConfirmAssignment reply
# (the node's authenticated call), and sends it on its own calls; stages forward it down the chain.
STEP_CAPABILITY_KEY = "swarm-step-capability"
MAX_CAPABILITY_CHARS = 128


def new_step_capability() -> str:
    """A fresh random capability (256 bits, URL-safe text so it fits gRPC metadata)."""
    return secrets.token_urlsafe(32)


def step_metadata(capability: str) -> tuple[tuple[str, str], ...]:
    return ((STEP_CAPABILITY_KEY, capability),)


def check_step_capability(context, expected: str, *, what: str) -> None:
    """Refuse a stage call whose metadata lacks ``expected`` (AuthError -> UNAUTHENTICATED) or
    carries another value (PermissionDeniedError -> PERMISSION_DENIED). Constant-time compare."""
    given = None
    for key, value in context.invocation_metadata() or ():
        if key == STEP_CAPABILITY_KEY:
            given = value if isinstance(value, str) else None
            break
    if not given:
        raise AuthError(
            f"{what}: the call carries no {STEP_CAPABILITY_KEY} metadata; only the coordinator that placed this "
            "stage and the previous stage of its chain may call it (clients go through the coordinator's Generate)"
        )
    ok = len(given) <= MAX_CAPABILITY_CHARS and hmac.compare_digest(given.encode(), expected.encode())
    if not ok:
        raise PermissionDeniedError(
            f"{what}: wrong {STEP_CAPABILITY_KEY}; the stage was (re)loaded with another one, or the caller is not "
            "part of this chain -- ask the coordinator (Generate) instead"
        )


# ----------------------------------------------------------------------------- sampling
def sampling_to_pb(p: SamplingParams) -> pb.ServeSamplingSpec:
    return pb.ServeSamplingSpec(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)


def sampling_from_pb(spec: pb.ServeSamplingSpec, *, max_new_tokens: int = 1, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Validated params from a request (raises InvalidRequestError)."""
    top_p = spec.top_p if spec.top_p != 0 else 1.0
    if not math.isfinite(spec.temperature) or not math.isfinite(top_p):
        raise InvalidRequestError("temperature and top_p must be finite numbers")
    return SamplingParams(
        temperature=float(spec.temperature),
        top_k=int(spec.top_k),
        top_p=float(top_p),
        seed=int(spec.seed) & ((1 << 63) - 1),
        max_new_tokens=max_new_tokens,
        stop=stop,
    )


# ----------------------------------------------------------------------------- step entries
def entries_to_pb(entries: list[StepEntry], *, with_tokens: bool) -> list[pb.ServeSessionEntry]:
    return [
        pb.ServeSessionEntry(
            session_id=e.session_id,
            start_position=e.start_position,
            num_tokens=e.num_tokens,
            token_ids=list(e.token_ids) if with_tokens else [],
            sampling=sampling_to_pb(e.sampling),
            reset=e.reset,
        )
        for e in entries
    ]


def entries_from_pb(msgs, *, need_tokens: bool) -> list[StepEntry]:
    """Domain entries from a StepRequest, bounded and validated (raises InvalidRequestError)."""
    if not 1 <= len(msgs) <= MAX_ENTRIES:
        raise InvalidRequestError(f"a step carries 1..{MAX_ENTRIES} session entries, got {len(msgs)}")
    total = sum(int(m.num_tokens) for m in msgs)
    if total > MAX_TOKENS_PER_STEP:
        raise InvalidRequestError(f"a step carries at most {MAX_TOKENS_PER_STEP} tokens, got {total}")
    out = []
    for m in msgs:
        if need_tokens and len(m.token_ids) != m.num_tokens:
            raise InvalidRequestError(f"session {m.session_id}: the first stage needs num_tokens token ids")
        out.append(
            StepEntry(
                session_id=m.session_id,
                start_position=int(m.start_position),
                num_tokens=int(m.num_tokens),
                token_ids=tuple(int(t) for t in m.token_ids) if need_tokens else (),
                reset=bool(m.reset),
                sampling=sampling_from_pb(m.sampling),
            )
        )
    return out


# ----------------------------------------------------------------------------- hidden states
def hidden_to_chunks(
    hidden: torch.Tensor, *, codec: str, label: str, boundary: int, replica: int, sender_id: str
) -> list:
    """TensorChunk messages (tensor.proto) carrying packed hidden states (N, H)."""
    check_codec(codec)
    if codec == "int8":
        payload, meta = int8_encode(hidden)
        dtype = "float32"
    else:
        payload, meta = wire.raw_encode(hidden), b""
        dtype = wire.dtype_name(hidden.dtype)
    header = wire.make_header(
        payload,
        job_id=label,
        step=0,
        micro_batch=0,
        shape=tuple(hidden.shape),
        dtype=dtype,
        codec=codec,
        codec_meta=meta,
        kind="hidden",
        boundary=boundary,
        sender_id=sender_id,
        replica=replica,
    )
    return list(wire.to_chunks(wire.WireTensor(header=header, payload=payload)))


def hidden_from_chunks(chunks, *, num_tokens: int, hidden_size: int, boundary: int, replica: int) -> torch.Tensor:
    """The (num_tokens, hidden_size) float tensor carried by ``chunks``, fully validated."""
    limit = num_tokens * hidden_size * 4
    t = wire.from_chunks(chunks, max_payload_bytes=max(limit, 1))
    h = t.header
    expect = wire.TensorExpectation(
        job_id=h.job_id, kind="hidden", shape=(num_tokens, hidden_size), boundary=boundary, replica=replica
    )
    wire.validate_header(h, expect)
    if h.codec == "int8":
        x = int8_decode(t.payload, h.codec_meta, (num_tokens, hidden_size))
    elif h.codec == "none":
        if h.dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidRequestError(f"hidden states must be floating point, got {h.dtype}")
        x = wire.raw_decode(t.payload, shape=(num_tokens, hidden_size), dtype=h.dtype)
    else:
        raise InvalidRequestError(f"hidden codec {h.codec!r} unknown; use none or int8")
    wire.check_finite(x, what="hidden states")
    return x


# ----------------------------------------------------------------------------- gateway client
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateEvent:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_replays: int = 0


def model_info_dict(m: pb.ServeModelInfo) -> dict:
    return {
        "name": m.name,
        "family": m.family,
        "num_layers": m.num_layers,
        "digest": m.digest,
        "state": m.state,
        "size_bytes": m.size_bytes,
        "max_seq_len": m.max_seq_len,
        "created_at": m.created_at_s,
        "error": m.error,
        "replicas": [
            {
                "replica": r.replica,
                "state": r.state,
                "predicted_latency_s": r.predicted_latency_s,
                "stages": [
                    {"node_id": s.node_id, "address": s.address, "first_layer": s.first_layer,
                     "last_layer_excl": s.last_layer_excl, "state": s.state}
                    for s in r.stages
                ],
            }
            for r in m.replicas
        ],
    }


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The files of a checkpoint directory that `swarm serve` uploads."""
    if not model_dir.is_dir():
        raise InvalidRequestError(f"{model_dir} is not a directory; point --model at an HF-format checkpoint")
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in UPLOAD_SUFFIXES)
    if not (model_dir / "config.json").is_file() or not any(p.suffix == ".safetensors" for p in files):
        raise InvalidRequestError(f"{model_dir} needs config.json and *.safetensors")
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upload_model(
    address: str,
    model_dir: str | Path,
    *,
    name: str,
    num_replicas: int = 1,
    num_stages: int = 0,
    max_seq_len: int = 0,
    sessions_per_replica: int = 0,
    objective: str = "",
    hidden_codec: str = "",
    dtype: str = "",
    lanes: int = 0,
    token: str | None = None,
    timeout_s: float = 600.0,
    progress=None,
) -> dict:
    """Stream a checkpoint to the coordinator and wait until it is placed and loaded.

    ``token`` is the coordinator's token (serving changes what the swarm runs)."""
    parse_address(address)
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    header = pb.ServeUploadHeader(
        name=name,
        num_replicas=num_replicas,
        files=[pb.ServeUploadFile(path=p.name, size_bytes=p.stat().st_size, sha256=_sha256(p)) for p in files],
        max_seq_len=max_seq_len,
        sessions_per_replica=sessions_per_replica,
        objective=objective,
        hidden_codec=hidden_codec,
        num_stages=num_stages,
        dtype=dtype,
        lanes=lanes,
    )

    def chunks() -> Iterator[pb.ServeUploadChunk]:
        yield pb.ServeUploadChunk(header=header)
        for p in files:
            with p.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    if progress is not None:
                        progress(len(block))
                    yield pb.ServeUploadChunk(path=p.name, data=block)

    with control_channel(address) as channel, translate_rpc_errors(f"coordinator at {address}"):
        reply = pb_grpc.InferenceGatewayStub(channel).UploadModel(
            chunks(), timeout=timeout_s, metadata=api_token_metadata(token))
    return model_info_dict(reply.model)


def list_models(address: str, *, timeout_s: float = 10.0) -> list[dict]:
    parse_address(address)
    with control_channel(address) as channel, translate_rpc_errors(f"coordinator at {address}"):
        reply = pb_grpc.InferenceGatewayStub(channel).ListModels(pb.ServeListModelsRequest(), timeout=timeout_s)
    return [model_info_dict(m) for m in reply.models]


def unserve_model(address: str, name: str, *, token: str | None = None, timeout_s: float = 30.0) -> bool:
    parse_address(address)
    with control_channel(address) as channel, translate_rpc_errors(f"coordinator at {address}"):
        reply = pb_grpc.InferenceGatewayStub(channel).Unserve(
            pb.ServeUnserveRequest(name=name), timeout=timeout_s, metadata=api_token_metadata(token))
    return reply.removed


def generate(
    address: str,
    *,
    model: str,
    prompt: str = "",
    prompt_token_ids: list[int] | None = None,
    params: SamplingParams,
    timeout_s: float = 600.0,
) -> Iterator[GenerateEvent]:
    """Stream a generation from the coordinator's gateway: one event per batch of new tokens."""
    parse_address(address)
    req = pb.ServeGenerateRequest(
        model=model,
        prompt=prompt,
        prompt_token_ids=list(prompt_token_ids or []),
        max_new_tokens=params.max_new_tokens,
        sampling=sampling_to_pb(params),
        stop=list(params.stop),
    )
    with control_channel(address) as channel, translate_rpc_errors(f"coordinator at {address}"):
        for ev in pb_grpc.InferenceGatewayStub(channel).Generate(req, timeout=timeout_s):
            yield GenerateEvent(
                token_ids=tuple(ev.token_ids),
                text=ev.text,
                finish_reason=ev.finish_reason,
                num_prompt_tokens=ev.num_prompt_tokens,
                num_replays=ev.num_replays,
            )
