"""The wire format of a tensor stream (``PipelineStream.Open``, swarm/transport/streams.py).

A frame is one ``TensorFrame`` message in protobuf's wire format, written by hand so the payload
is copied once: field 1 the seq (varint), field 2 the serialised ``TensorHeader`` (payload size and
CRC-32 among its fields), then either field 3, the payload itself, or field 4, the name of the
sender's shared-memory slot holding it (swarm/transport/shm.py; nodes of one host). An ack is
field 1, the seq it acknowledges. Fields come in this order, once each; anything else is refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from swarm.errors import InvalidRequestError
from swarm.proto.v1 import tensor_pb2
from swarm.transport import shm as shm_mod
from swarm.transport import tensors as wt

MAX_HEADER_BYTES = wt.MAX_CODEC_META_BYTES + (1 << 20)  # codec meta plus sample ids and the rest


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(mv: memoryview, off: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if off >= len(mv) or shift > 63:
            raise InvalidRequestError("tensor frame is truncated or has a malformed length")
        b = mv[off]
        off += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, off
        shift += 7


def encode_frame(seq: int, header: wt.TensorHeader, parts: Sequence) -> bytes:
    """One TensorFrame message: ``parts`` (bytes-like, in order) are the payload, whose size and
    CRC-32 ``header`` must already state. One copy of the payload (into the message)."""
    h = wt.header_to_pb(header).SerializeToString()
    head = b"\x08" + _varint(seq) + b"\x12" + _varint(len(h)) + h + b"\x1a" + _varint(header.payload_bytes)
    return b"".join([head, *parts])


def encode_ref_frame(seq: int, header: wt.TensorHeader, slot_name: str) -> bytes:
    """A TensorFrame whose payload is in the shared-memory slot ``slot_name`` (field 4)."""
    h = wt.header_to_pb(header).SerializeToString()
    name = slot_name.encode()
    return b"\x08" + _varint(seq) + b"\x12" + _varint(len(h)) + h + b"\x22" + _varint(len(name)) + name


def decode_frame(buf: bytes, *, max_payload_bytes: int,
                 shm: shm_mod.ShmReader | None = None) -> tuple[int, wt.TensorHeader, memoryview]:
    """(seq, header, payload) of a received frame; the payload is a view into ``buf`` (no copy),
    or a copy out of the shared-memory slot the frame names (only with a ``shm`` reader).

    Raises InvalidRequestError when fields are missing, repeated, out of order or unknown, the
    payload is larger than ``max_payload_bytes`` or its header says, or the CRC-32 differs;
    ShmUnavailableError when the named slot cannot be read here."""
    mv = memoryview(buf)
    if len(mv) < 2 or mv[0] != 0x08:
        raise InvalidRequestError("tensor frame must start with its seq")
    seq, off = _read_varint(mv, 1)
    if off >= len(mv) or mv[off] != 0x12:
        raise InvalidRequestError("tensor frame must carry its header after the seq")
    hlen, off = _read_varint(mv, off + 1)
    if hlen > MAX_HEADER_BYTES or off + hlen > len(mv):
        raise InvalidRequestError(f"tensor frame header of {hlen} bytes is truncated or too large")
    try:
        header_pb = tensor_pb2.TensorHeader.FromString(mv[off:off + hlen])
    except DecodeError:
        raise InvalidRequestError("tensor frame header is not a valid TensorHeader message") from None
    header = wt.header_from_pb(header_pb)
    off += hlen
    if header.payload_bytes > max_payload_bytes:
        raise InvalidRequestError(
            f"tensor payload of {header.payload_bytes} bytes exceeds the limit of {max_payload_bytes}; "
            "use smaller micro-batches or a compressing codec")
    if off == len(mv):  # proto3 leaves an empty payload out
        payload = mv[off:off]
    elif mv[off] == 0x22 and shm is not None:  # the payload is in a shared-memory slot
        nlen, off = _read_varint(mv, off + 1)
        if nlen > 128 or off + nlen != len(mv):
            raise InvalidRequestError("tensor frame's shared-memory slot name is malformed")
        try:
            name = bytes(mv[off:]).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidRequestError("tensor frame's shared-memory slot name is not ASCII") from None
        payload = memoryview(shm.read(name, header.payload_bytes))
    else:
        if mv[off] != 0x1A:
            raise InvalidRequestError("tensor frame has an unknown field after its header")
        plen, off = _read_varint(mv, off + 1)
        if off + plen != len(mv):
            raise InvalidRequestError("tensor frame payload length does not match the message")
        payload = mv[off:]
    if len(payload) != header.payload_bytes:
        raise InvalidRequestError(f"tensor payload has {len(payload)} bytes, header announced {header.payload_bytes}")
    if header.payload_crc32 and zlib.crc32(payload) & 0xFFFFFFFF != header.payload_crc32:
        raise InvalidRequestError("tensor payload checksum mismatch: the data was corrupted in transit")
    return seq, header, payload


def encode_ack(seq: int) -> bytes:
    return b"\x08" + _varint(seq)


def decode_ack(buf: bytes) -> int:
    mv = memoryview(buf)
    if not len(mv):
        return 0
    if mv[0] != 0x08:
        raise InvalidRequestError("malformed tensor frame ack")
    return _read_varint(mv, 1)[0]


def payload_header(parts: Sequence, *, checksum: bool = True, **fields) -> wt.TensorHeader:
    """A header for the payload made of ``parts`` (size and CRC-32 over all of them).

    ``checksum=False`` leaves the CRC 0, which receivers take as "not computed": for streams
    over TLS, whose records are authenticated (AES-GCM) so a CRC adds nothing but ~0.4 ms of CPU
    per MiB on each side; plaintext streams (benchmarks only) keep it. A CRC never defended
    against a hostile peer, who can compute one."""
    crc, n = 0, 0
    for p in parts:
        if checksum:
            crc = zlib.crc32(p, crc)
        n += memoryview(p).nbytes
    return wt.TensorHeader(payload_bytes=n, payload_crc32=crc & 0xFFFFFFFF, **fields)
