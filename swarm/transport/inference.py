"""Inference messages on the wire: step capability, sampling, step entries, hidden states.

Servicers (node/inference, coordinator/inference) use these helpers so that protobuf stays
here; everything past them sees :class:`StepEntry` and tensors. Users reach the gateway through
:class:`swarm.transport.coordinator_client.CoordinatorClient`.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets

import torch

from swarm.errors import AuthError, InvalidRequestError, PermissionDeniedError
from swarm.inference.codec import check_codec, int8_decode, int8_encode
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StepEntry
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport import tensors as wire
from swarm.transport.convert import sampling_to_pb

log = logging.getLogger(__name__)

MAX_ENTRIES = 1024
MAX_TOKENS_PER_STEP = 1 << 16


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
            replay_stages=e.replay_stages,
        )
        for e in entries
    ]


_NO_SAMPLING = SamplingParams()
HIDDEN_DTYPES = ("float32", "float16", "bfloat16")  # what hidden states may travel as, raw or in chunks


def entries_from_pb(msgs, *, need_tokens: bool, need_sampling: bool = True) -> list[StepEntry]:
    """Domain entries from a StepRequest, bounded and validated (raises InvalidRequestError).
    ``need_sampling`` False (a stage that samples nothing): the entries' sampling is not read."""
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
                sampling=sampling_from_pb(m.sampling) if need_sampling else _NO_SAMPLING,
                replay_stages=int(m.replay_stages),
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


def hidden_fields(hidden: torch.Tensor, *, codec: str, raw: bool, label: str, boundary: int, replica: int,
                  sender_id: str) -> dict:
    """The ServeStepRequest fields carrying packed hidden states (N, H) to the next stage: codec
    ``none`` to a stage that reads them raw (``raw``: it said so in its StepWire answer) as raw
    bytes (``hidden_raw``, ``hidden_dtype``: the decode hot path, no chunk framing), else as
    TensorChunks (``hidden``), which every node reads."""
    check_codec(codec)
    if codec == "none" and raw:
        return {"hidden_raw": wire.raw_encode(hidden), "hidden_dtype": wire.dtype_name(hidden.dtype)}
    return {"hidden": hidden_to_chunks(hidden, codec=codec, label=label, boundary=boundary, replica=replica,
                                       sender_id=sender_id)}


def hidden_from_request(request: pb.ServeStepRequest, *, num_tokens: int, hidden_size: int, boundary: int,
                        replica: int) -> torch.Tensor:
    """The (num_tokens, hidden_size) float tensor a step carries (``hidden_raw`` or ``hidden``),
    fully validated: size, dtype, finite (raises InvalidRequestError saying what is wrong)."""
    if request.hidden_raw:
        if request.hidden:
            raise InvalidRequestError("a step carries its hidden states either raw (hidden_raw) or as chunks, not both")
        if request.hidden_dtype not in HIDDEN_DTYPES:
            raise InvalidRequestError(f"hidden_dtype {request.hidden_dtype[:32]!r} unsupported; use one of "
                                      f"{', '.join(HIDDEN_DTYPES)}")
        x = wire.raw_decode(request.hidden_raw, shape=(num_tokens, hidden_size), dtype=request.hidden_dtype)
        wire.check_finite(x, what="hidden states")
        return x
    return hidden_from_chunks(request.hidden, num_tokens=num_tokens, hidden_size=hidden_size, boundary=boundary,
                              replica=replica)


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
        if h.dtype not in HIDDEN_DTYPES:
            raise InvalidRequestError(f"hidden states must be floating point, got {h.dtype}")
        x = wire.raw_decode(t.payload, shape=(num_tokens, hidden_size), dtype=h.dtype)
    else:
        raise InvalidRequestError(f"hidden codec {h.codec!r} unknown; use none or int8")
    wire.check_finite(x, what="hidden states")
    return x


def commitments_from_pb(reply: pb.ServeStepReply, session_ids: list[str], num_stages: int, *,
                        num_committed: int | None = None) -> dict[str, list[tuple[tuple[float, ...], tuple[float, ...]]]]:
    """The stages' commitments in a step reply (swarm/inference/verify.py), validated: for each
    of ``session_ids``, (input sketch, output sketch) per stage in order. What a stage did not
    send, sent twice (the first counts) or sent malformed is ``((), ())``: it cannot pass a check.
    ``num_committed``: how many entries the step asked commitments for (default: ``session_ids``);
    at most that many per stage are read."""
    from swarm.inference.verify import SKETCH_DIM

    wanted = set(session_ids)
    out = {sid: [((), ())] * num_stages for sid in session_ids}
    seen: set[tuple[str, int]] = set()
    last_rows = [c for c in reply.commitments[: 2 * MAX_COMMITMENTS] if c.position == 0]
    for c in last_rows[: (len(session_ids) if num_committed is None else num_committed) * num_stages]:
        key = (c.session_id, c.stage)
        if c.session_id not in wanted or not 0 <= c.stage < num_stages or key in seen:
            continue
        seen.add(key)
        inp = tuple(c.input) if len(c.input) == SKETCH_DIM else ()
        outp = tuple(c.output) if len(c.output) == SKETCH_DIM else ()
        out[c.session_id][c.stage] = (inp, outp)
    return out


MAX_COMMITMENTS = 1 << 16  # commitments read from one reply (a stage sends one per entry or point)


def point_commitments_from_pb(reply: pb.ServeStepReply, session_id: str, positions: list[int], num_stages: int
                              ) -> dict[int, tuple[list[tuple[tuple[float, ...], tuple[float, ...]]], int | None]]:
    """The stages' commitments at the replay rows ``positions`` of ``session_id``
    (``commit_points``; node/inference/commitments.py), validated: for each position, (input
    sketch, output sketch) per stage in order, and the last stage's token (None when it sent
    none). Missing, repeated (the first counts) or malformed ones are ``((), ())``: they cannot
    pass a check."""
    from swarm.inference.verify import SKETCH_DIM

    wanted = set(positions)
    out = {p: [((), ())] * num_stages for p in positions}
    tokens: dict[int, int | None] = {p: None for p in positions}
    seen: set[tuple[int, int]] = set()
    for c in reply.commitments[: 2 * MAX_COMMITMENTS]:
        p = c.position - 1
        if c.position == 0 or c.session_id != session_id or p not in wanted or not 0 <= c.stage < num_stages:
            continue
        if (p, c.stage) in seen:
            continue
        seen.add((p, c.stage))
        inp = tuple(c.input) if len(c.input) == SKETCH_DIM else ()
        outp = tuple(c.output) if len(c.output) == SKETCH_DIM else ()
        out[p] = out[p][: c.stage] + [(inp, outp)] + out[p][c.stage + 1:]
        if c.stage == num_stages - 1:
            tokens[p] = int(c.token)
    return {p: (out[p], tokens[p]) for p in positions}
