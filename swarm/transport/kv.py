"""A session's KV cache on the wire (disaggregated serving), in the one tensor format (tensors.py).

``ImportKV`` is a stream of ``ServeKVChunk``: the first names the model and the receiving
(decode) chain's replica, every one carries the next ``TensorChunk`` of one tensor of kind
``kv_cache``: shape (layers, 2, kv_heads, positions, head_dim), raw (codec ``none``), header
``job_id`` = session id, ``step`` = positions, ``boundary`` = stage, ``replica`` = the receiving
chain, ``sender_id`` = the sending node. The receiver checks every field against what its stage
expects (:class:`KVExpectation`) before reading past the first chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from swarm.errors import InvalidRequestError
from swarm.inference.stage_runtime import MAX_SESSION_ID_CHARS
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport import tensors as wire

MAX_NAME_CHARS = 128


def kv_to_chunks(kv: torch.Tensor, *, session_id: str, model_name: str, stage: int, replica: int,
                 sender_id: str, payload: bytes | None = None, nonce: bytes = b"") -> Iterator[pb.ServeKVChunk]:
    """The ImportKV messages carrying ``kv`` (layers, 2, kv_heads, positions, head_dim) to the
    stage ``stage`` of replica ``replica``. ``payload``: ``wire.raw_encode(kv)`` when the caller
    already made it (the sender hashes those bytes: swarm/inference/kv_receipt.py); ``nonce``:
    the coordinator's for this hand-off, in the first message (signed into the receipt)."""
    payload = wire.raw_encode(kv) if payload is None else payload
    header = wire.make_header(payload, job_id=session_id, step=int(kv.shape[3]), micro_batch=0, shape=tuple(kv.shape),
                              dtype=wire.dtype_name(kv.dtype), codec="none", kind="kv_cache", boundary=stage,
                              sender_id=sender_id, replica=replica)
    for i, chunk in enumerate(wire.to_chunks(wire.WireTensor(header=header, payload=payload))):
        yield pb.ServeKVChunk(model_name=model_name if i == 0 else "", replica=replica if i == 0 else 0, tensor=chunk,
                              handoff_nonce=nonce if i == 0 else b"")


def kv_target(first: pb.ServeKVChunk | None) -> tuple[str, int]:
    """(model name, replica) named by an ImportKV stream's first message."""
    if first is None or not first.model_name or len(first.model_name) > MAX_NAME_CHARS or first.replica < 0:
        raise InvalidRequestError("an ImportKV stream starts with a chunk naming the model and the receiving replica")
    return first.model_name, int(first.replica)


@dataclass(frozen=True, slots=True, kw_only=True)
class KVExpectation:
    """What a decode stage accepts: its stage index and replica, its dtype, the allowed senders
    (the prefill nodes of its stage, from the coordinator's assignment) and ``shape(positions)``."""

    stage: int
    replica: int
    dtype: str
    senders: frozenset[str]
    max_positions: int
    shape: Callable[[int], tuple[int, ...]]


def kv_from_chunks(first: pb.ServeKVChunk, rest: Iterable[pb.ServeKVChunk], expect: KVExpectation
                   ) -> tuple[str, torch.Tensor, bytes]:
    """(session id, KV tensor, its payload bytes as received) from an ImportKV stream, every field
    validated (InvalidRequestError)."""
    def on_header(h: wire.TensorHeader) -> None:
        if not 1 <= len(h.job_id) <= MAX_SESSION_ID_CHARS:
            raise InvalidRequestError(f"KV cache: session id must be 1..{MAX_SESSION_ID_CHARS} characters")
        if not 1 <= h.step < expect.max_positions:
            raise InvalidRequestError(f"KV cache of {h.step} positions: this stage serves 1..{expect.max_positions - 1}")
        wire.validate_header(h, wire.TensorExpectation(
            job_id=h.job_id, kind="kv_cache", shape=expect.shape(h.step), dtype=expect.dtype, codec="none",
            boundary=expect.stage, replica=expect.replica, sender_ids=expect.senders))
        itemsize = wire.DTYPES[h.dtype].itemsize
        if h.payload_bytes != h.numel * itemsize:
            raise InvalidRequestError(f"KV cache payload of {h.payload_bytes} bytes, shape {h.shape} needs "
                                      f"{h.numel * itemsize}")

    shape_max = expect.shape(expect.max_positions)
    itemsize = wire.DTYPES[expect.dtype].itemsize
    limit = itemsize
    for d in shape_max:
        limit *= d

    def chunks() -> Iterator:
        yield first.tensor
        for c in rest:
            yield c.tensor

    t = wire.from_chunks(chunks(), max_payload_bytes=limit, on_header=on_header)
    kv = wire.raw_decode(t.payload, shape=t.header.shape, dtype=t.header.dtype)
    wire.check_finite(kv, what="KV cache")
    return t.header.job_id, kv, t.payload
