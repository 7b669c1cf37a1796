"""A boundary message: one micro-batch's activations (forward) or gradients (backward).

Layout (little-endian)::

    magic "SWC1" | kind u8 (0 none, 1 direct, 2 aqsgd) | direction u8 (0 fw, 1 bw) | reserved u16
    | key fingerprint u64 | B u32 | sample ids: B x i64 | delta flags: B x u8
    | fresh length u32 | fresh EncodedTensor | delta length u32 | delta EncodedTensor

Rows whose delta flag is 0 are in ``fresh`` (in order), the others in ``delta`` (AQ-SGD changes
since the sample's last visit). A length of 0 means the part is absent.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

import torch

from swarm.compression.wire import DEFAULT_MAX_NUMEL, EncodedTensor
from swarm.errors import InvalidRequestError

MAGIC = b"SWC1"
_HEAD = struct.Struct("<4sBBHQI")
KIND_CODES = {"none": 0, "direct": 1, "aqsgd": 2}
CODE_KINDS = {v: k for k, v in KIND_CODES.items()}
FORWARD, BACKWARD = "forward", "backward"
MAX_BATCH = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecMessage:
    """What crosses a boundary for one micro-batch. Build with :class:`BoundaryCodec`."""

    kind: str
    direction: str
    key_fingerprint: int
    sample_ids: tuple[int, ...]
    delta_mask: tuple[bool, ...]
    fresh: EncodedTensor | None = None
    delta: EncodedTensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_CODES or self.direction not in (FORWARD, BACKWARD):
            raise InvalidRequestError(f"bad codec message kind {self.kind!r} / direction {self.direction!r}")
        if len(self.delta_mask) != len(self.sample_ids):
            raise InvalidRequestError("codec message needs one delta flag per sample")
        n_delta = sum(self.delta_mask)
        n_fresh = len(self.sample_ids) - n_delta
        for name, part, rows in (("fresh", self.fresh, n_fresh), ("delta", self.delta, n_delta)):
            if rows == 0 and part is not None:
                raise InvalidRequestError(f"codec message has a {name} part but no {name} rows")
            if rows and (part is None or not part.shape or part.shape[0] != rows):
                raise InvalidRequestError(f"codec message {name} part must hold {rows} rows")

    @property
    def batch_size(self) -> int:
        return len(self.sample_ids)

    @property
    def nbytes(self) -> int:
        """Exact size of :meth:`to_bytes`: the bytes this message puts on the wire."""
        n = _HEAD.size + 9 * len(self.sample_ids) + 8
        for part in (self.fresh, self.delta):
            n += part.nbytes if part is not None else 0
        return n

    @property
    def payload_nbytes(self) -> int:
        """Bytes of tensor payload (codes, scales and raw values), without any header."""
        return sum(p.nbytes - p.header_nbytes for p in (self.fresh, self.delta) if p is not None)

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers())

    def buffers(self) -> list:
        """The parts of :meth:`to_bytes` in order, not joined: small header bytes and views of
        the tensors' bytes (a sender joins them once, into its network message)."""
        B = len(self.sample_ids)
        out = [
            _HEAD.pack(MAGIC, KIND_CODES[self.kind], 0 if self.direction == FORWARD else 1, 0, self.key_fingerprint, B)
            + struct.pack(f"<{B}q", *self.sample_ids) + bytes(int(m) for m in self.delta_mask),
        ]
        for part in (self.fresh, self.delta):
            if part is None:
                out.append(struct.pack("<I", 0))
                continue
            out.append(struct.pack("<I", part.nbytes))
            out.extend(part.buffers())
        return out

    def to_host(self) -> tuple["CodecMessage", object]:
        """This message with its tensors copied to pinned host memory without blocking, and a
        CUDA event that completes when the copies have (``(self, None)`` when already on the
        host). Call from the thread that made the message, so the copies follow its kernels;
        wait on the event before reading the bytes (another thread may)."""
        parts = [p for p in (self.fresh, self.delta) if p is not None]
        if not parts or all(p.data.device.type == "cpu" for p in parts):
            return self, None

        def host(t):
            if t is None or t.device.type == "cpu":
                return t
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
            return out

        device = next(p.data.device for p in parts if p.data.device.type == "cuda")
        with torch.cuda.device(device):  # the copies queue on that GPU's stream: so must the event
            moved = [None if p is None else dataclasses.replace(p, data=host(p.data), scales=host(p.scales))
                     for p in (self.fresh, self.delta)]
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return dataclasses.replace(self, fresh=moved[0], delta=moved[1]), event

    @classmethod
    def from_bytes(
        cls, buf: bytes | bytearray | memoryview, *, device: torch.device | str = "cpu", max_numel: int = DEFAULT_MAX_NUMEL
    ) -> "CodecMessage":
        """Parse and validate a message. Raises InvalidRequestError on anything malformed."""
        mv = memoryview(buf)
        if len(mv) < _HEAD.size:
            raise InvalidRequestError(f"codec message of {len(mv)} bytes is shorter than its header")
        magic, kind, direction, _, fp, B = _HEAD.unpack_from(mv, 0)
        if magic != MAGIC:
            raise InvalidRequestError("codec message has a wrong magic; the peer speaks another format")
        if kind not in CODE_KINDS or direction not in (0, 1):
            raise InvalidRequestError(f"codec message has unknown kind {kind} or direction {direction}")
        if B > MAX_BATCH:
            raise InvalidRequestError(f"codec message claims {B} samples (limit {MAX_BATCH})")
        off = _HEAD.size
        if len(mv) < off + 9 * B + 8:
            raise InvalidRequestError("codec message is truncated")
        ids = struct.unpack_from(f"<{B}q", mv, off)
        off += 8 * B
        flags = bytes(mv[off:off + B])
        off += B
        if any(f > 1 for f in flags):
            raise InvalidRequestError("codec message delta flags must be 0 or 1")
        parts = []
        for _ in range(2):
            if len(mv) < off + 4:
                raise InvalidRequestError("codec message is truncated before a part")
            (length,) = struct.unpack_from("<I", mv, off)
            off += 4
            if len(mv) < off + length:
                raise InvalidRequestError("codec message part is truncated")
            parts.append(EncodedTensor.from_bytes(mv[off:off + length], device=device, max_numel=max_numel) if length else None)
            off += length
        if off != len(mv):
            raise InvalidRequestError(f"codec message has {len(mv) - off} trailing bytes")
        return cls(
            kind=CODE_KINDS[kind], direction=FORWARD if direction == 0 else BACKWARD, key_fingerprint=fp,
            sample_ids=tuple(ids), delta_mask=tuple(bool(f) for f in flags), fresh=parts[0], delta=parts[1],
        )
