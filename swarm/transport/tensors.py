"""Tensors on the wire: headers, chunking, reassembly and validation.

A tensor travels as a stream of ``TensorChunk`` messages (protos/swarm/proto/v1/tensor.proto):
the first carries a :class:`TensorHeader`, every chunk carries the next bytes of the payload.
The payload is whatever the codec named in the header produced (raw little-endian bytes for
``none``). This module never interprets codecs: it checks the framing (sizes, checksum,
header consistency) and, through :func:`validate_header`, that a tensor is the one a receiver
expects. Training activations/gradients and inference hidden states all use it.

Everything here treats the bytes from the network as hostile: every size is bounded before
anything is allocated and every mismatch raises :class:`~swarm.errors.InvalidRequestError`
with a message naming the field.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from swarm.compression.wire import all_finite
from swarm.errors import InvalidRequestError
from swarm.proto.v1 import tensor_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
DEFAULT_MAX_PAYLOAD_BYTES = 512 << 20  # no single boundary tensor of ours comes near this
MAX_CODEC_META_BYTES = 4 << 20  # per-channel scales of a large tensor fit easily
MAX_SAMPLE_IDS = 1 << 16
MAX_NDIM = 8

KINDS = ("activation", "gradient", "hidden", "witness_input", "witness_output", "witness_grad_out", "witness_grad_in",
         "kv_cache", "witness_output_ref")
_KIND_TO_PB = {
    "activation": pb.TENSOR_KIND_ACTIVATION,
    "gradient": pb.TENSOR_KIND_GRADIENT,
    "hidden": pb.TENSOR_KIND_HIDDEN,
    # spot checks: copies a checked stage's neighbours send its checker (node/training/spotcheck.py)
    "witness_input": pb.TENSOR_KIND_WITNESS_INPUT,
    "witness_output": pb.TENSOR_KIND_WITNESS_OUTPUT,
    "witness_grad_out": pb.TENSOR_KIND_WITNESS_GRAD_OUT,
    "witness_grad_in": pb.TENSOR_KIND_WITNESS_GRAD_IN,
    "witness_output_ref": pb.TENSOR_KIND_WITNESS_OUTPUT_REF,  # an AQ-SGD receiver's m(x) before the message
    # disaggregated serving: a session's KV cache, prefill stage -> decode stage (node/inference/kv_handoff.py)
    "kv_cache": pb.TENSOR_KIND_KV_CACHE,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
          torch.uint8: np.uint8}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; raises InvalidRequestError for unsupported ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidRequestError(f"dtype {dtype} cannot travel on the wire; use one of {sorted(DTYPES)}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorHeader:
    """What a tensor message says about itself. Sizes and checksum describe the encoded payload."""

    job_id: str
    step: int
    micro_batch: int
    sample_ids: tuple[int, ...] = ()
    shape: tuple[int, ...]
    dtype: str
    codec: str = "none"
    codec_meta: bytes = b""
    payload_bytes: int
    payload_crc32: int
    kind: str
    boundary: int = 0
    sender_id: str = ""
    replica: int = 0
    attempt: int = 0

    def __post_init__(self) -> None:
        if not self.job_id:
            raise InvalidRequestError("tensor header has no job_id; set the job or session id")
        if self.step < 0 or self.micro_batch < 0 or self.boundary < 0 or self.replica < 0:
            raise InvalidRequestError(
                f"tensor header has a negative step/micro_batch/boundary/replica "
                f"({self.step}/{self.micro_batch}/{self.boundary}/{self.replica})"
            )
        if len(self.shape) > MAX_NDIM or any(d < 0 for d in self.shape):
            raise InvalidRequestError(f"tensor shape {self.shape} is invalid (at most {MAX_NDIM} non-negative dims)")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"tensor dtype {self.dtype!r} unsupported; use one of {sorted(DTYPES)}")
        if self.kind not in KINDS:
            raise InvalidRequestError(f"tensor kind {self.kind!r} unknown; use one of {KINDS}")
        if len(self.sample_ids) > MAX_SAMPLE_IDS:
            raise InvalidRequestError(f"{len(self.sample_ids)} sample ids exceed the limit of {MAX_SAMPLE_IDS}")
        if len(self.codec_meta) > MAX_CODEC_META_BYTES:
            raise InvalidRequestError(f"codec_meta of {len(self.codec_meta)} bytes exceeds {MAX_CODEC_META_BYTES}")
        if self.payload_bytes < 0 or not 0 <= self.payload_crc32 < (1 << 32):
            raise InvalidRequestError("tensor header has a negative payload size or an invalid checksum")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True, kw_only=True)
class WireTensor:
    """A reassembled, framing-checked tensor message: header plus encoded payload bytes."""

    header: TensorHeader
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorExpectation:
    """What a receiver will accept. ``None`` fields are not checked."""

    job_id: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    codec: str | None = None
    step: int | None = None
    micro_batch: int | None = None
    boundary: int | None = None
    replica: int | None = None
    attempt: int | None = None
    sender_ids: frozenset[str] | None = None
    num_sample_ids: int | None = None


def make_header(payload: bytes, **fields) -> TensorHeader:
    """A header for ``payload`` with its size and CRC-32 filled in."""
    return TensorHeader(payload_bytes=len(payload), payload_crc32=zlib.crc32(payload) & 0xFFFFFFFF, **fields)


def header_to_pb(h: TensorHeader) -> pb.TensorHeader:
    return pb.TensorHeader(
        job_id=h.job_id,
        step=h.step,
        micro_batch=h.micro_batch,
        sample_ids=list(h.sample_ids),
        shape=list(h.shape),
        dtype=h.dtype,
        codec=h.codec,
        codec_meta=h.codec_meta,
        payload_bytes=h.payload_bytes,
        payload_crc32=h.payload_crc32,
        kind=_KIND_TO_PB[h.kind],
        boundary=h.boundary,
        sender_id=h.sender_id,
        replica=h.replica,
        attempt=h.attempt,
    )


def header_from_pb(m: pb.TensorHeader) -> TensorHeader:
    """Domain header from a received message; raises InvalidRequestError when malformed."""
    if m.kind not in _PB_TO_KIND:
        raise InvalidRequestError(f"tensor kind {m.kind} unknown")
    if len(m.sample_ids) > MAX_SAMPLE_IDS or len(m.shape) > MAX_NDIM:
        raise InvalidRequestError("tensor header has too many sample ids or dimensions")
    return TensorHeader(
        job_id=m.job_id,
        step=m.step,
        micro_batch=m.micro_batch,
        sample_ids=tuple(m.sample_ids),
        shape=tuple(m.shape),
        dtype=m.dtype,
        codec=m.codec,
        codec_meta=bytes(m.codec_meta),
        payload_bytes=m.payload_bytes,
        payload_crc32=m.payload_crc32,
        kind=_PB_TO_KIND[m.kind],
        boundary=m.boundary,
        sender_id=m.sender_id,
        replica=m.replica,
        attempt=m.attempt,
    )


def to_chunks(wire: WireTensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """The messages that carry ``wire``: header with the first chunk, then the rest."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    payload = memoryview(wire.payload)
    first = bytes(payload[:chunk_bytes])
    yield pb.TensorChunk(header=header_to_pb(wire.header), data=first)
    for start in range(chunk_bytes, len(payload), chunk_bytes):
        yield pb.TensorChunk(data=bytes(payload[start : start + chunk_bytes]))


def from_chunks(
    chunks: Iterable[pb.TensorChunk], *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    on_header: Callable[[TensorHeader], None] | None = None,
) -> WireTensor:
    """Reassemble one tensor from its chunk stream, checking size and checksum.

    ``on_header`` sees the header before any payload beyond the first chunk is read, and may
    raise to refuse the tensor early (a receiver checking it against what it expects).

    Raises InvalidRequestError when the stream is empty, the first chunk has no header, a later
    chunk repeats a header, the payload is larger than announced or than ``max_payload_bytes``,
    or the CRC-32 does not match.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise InvalidRequestError("empty tensor stream: send a chunk with a header first")
    if not first.HasField("header"):
        raise InvalidRequestError("the first chunk of a tensor stream must carry the header: send the header first")
    header = header_from_pb(first.header)
    if header.payload_bytes > max_payload_bytes:
        raise InvalidRequestError(
            f"tensor payload of {header.payload_bytes} bytes exceeds the limit of {max_payload_bytes}; "
            "use smaller micro-batches or a compressing codec"
        )
    if on_header is not None:
        on_header(header)
    buf = bytearray()
    buf += first.data
    for chunk in it:
        if chunk.HasField("header"):
            raise InvalidRequestError("a tensor stream carries exactly one header; send one tensor per stream")
        if len(buf) + len(chunk.data) > header.payload_bytes:
            raise InvalidRequestError(
                f"tensor payload is larger than the {header.payload_bytes} bytes its header announced"
            )
        buf += chunk.data
    if len(buf) != header.payload_bytes:
        raise InvalidRequestError(f"tensor payload has {len(buf)} bytes, header announced {header.payload_bytes}")
    if zlib.crc32(buf) & 0xFFFFFFFF != header.payload_crc32:
        raise InvalidRequestError("tensor payload checksum mismatch: the data was corrupted in transit")
    return WireTensor(header=header, payload=bytes(buf))


def validate_header(header: TensorHeader, expected: TensorExpectation) -> None:
    """Raise InvalidRequestError naming the first field where ``header`` differs from ``expected``."""

    def check(name: str, got, want) -> None:
        if want is not None and got != want:
            raise InvalidRequestError(f"tensor rejected: {name} is {got!r}, expected {want!r}")

    check("job_id", header.job_id, expected.job_id)
    check("kind", header.kind, expected.kind)
    check("shape", tuple(header.shape), None if expected.shape is None else tuple(expected.shape))
    check("dtype", header.dtype, expected.dtype)
    check("codec", header.codec, expected.codec)
    check("step", header.step, expected.step)
    check("micro_batch", header.micro_batch, expected.micro_batch)
    check("boundary", header.boundary, expected.boundary)
    check("replica", header.replica, expected.replica)
    check("attempt", header.attempt, expected.attempt)
    check("number of sample ids", len(header.sample_ids), expected.num_sample_ids)
    if expected.sender_ids is not None and header.sender_id not in expected.sender_ids:
        raise InvalidRequestError(f"tensor rejected: sender {header.sender_id!r} is not a pipeline neighbour")


def raw_encode(tensor: torch.Tensor) -> bytes:
    """Uncompressed payload: contiguous little-endian bytes of ``tensor`` (codec ``none``)."""
    dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the same 2 bytes as int16
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def raw_decode(payload: bytes, *, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """Inverse of :func:`raw_encode`; checks the size against shape and dtype."""
    torch_dtype = DTYPES[dtype]
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch_dtype.itemsize
    if len(payload) != numel * itemsize:
        raise InvalidRequestError(
            f"raw tensor payload has {len(payload)} bytes, shape {tuple(shape)} of {dtype} needs {numel * itemsize}"
        )
    if torch_dtype == torch.bfloat16:
        arr = np.frombuffer(payload, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    arr = np.frombuffer(payload, dtype=_NUMPY[torch_dtype]).copy()
    return torch.from_numpy(arr).reshape(shape)


def check_finite(tensor: torch.Tensor, *, what: str = "tensor") -> None:
    """Raise InvalidRequestError when a floating tensor holds NaN or Inf."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise InvalidRequestError(f"{what} holds NaN or Inf values; refusing to use it")
