"""One tensor on the wire: raw or k-bit quantized, with its shape, dtype, bits and scales.

Layout (little-endian)::

    magic "SWT1" | encoding u8 (0 raw, 1 quantized in groups, 2 quantized per channel) | dtype u8
    | bits u8 | ndim u8
    | group_size u32 | numel u64 | shape: ndim x u32
    | quantized: lo/scale as bfloat16 pairs, 4 bytes per group | payload
    raw payload: numel values of dtype; quantized payload: packed codes (quantizer.py)

Per-channel encoding: a tensor (..., C) is viewed as N = numel / C rows; each of the C columns is
one group (its N values, padded to a multiple of 8 with the column's first value), so
``group_size`` is that padded N and there are C scale pairs.

:func:`EncodedTensor.from_bytes` checks every field and raises InvalidRequestError on anything
malformed (wrong magic, unknown dtype, bits outside 2..8, sizes that do not add up, NaN/Inf).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from swarm.compression import backends
from swarm.compression import quantizer as q
from swarm.errors import InvalidRequestError

MAGIC = b"SWT1"
_HEAD = struct.Struct("<4sBBBBIQ")  # magic, encoding, dtype, bits, ndim, group_size, numel
MAX_NDIM = 8
RAW, QUANT, QUANT_CHANNEL = 0, 1, 2
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
DEFAULT_MAX_NUMEL = 1 << 31


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedTensor:
    """A tensor as it travels: ``bits == 0`` raw, else quantized with per-group scales.

    ``data``: uint8 (raw bytes of ``dtype``, or packed codes); ``scales``: bfloat16 (ng, 2) with
    columns (lo, scale), or None for raw. ``per_channel``: one group per last-dimension channel
    (see the module docstring). Tensors live on the device that made them.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group_size: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise InvalidRequestError(f"tensor dtype {self.dtype} cannot travel; use float32, float16 or bfloat16")
        if len(self.shape) > MAX_NDIM:
            raise InvalidRequestError(f"tensors of more than {MAX_NDIM} dimensions cannot travel")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def header_nbytes(self) -> int:
        return _HEAD.size + 4 * len(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact size of :meth:`to_bytes`."""
        scales = 0 if self.scales is None else self.scales.numel() * 2
        return self.header_nbytes + scales + self.data.numel()

    def to_bytes(self) -> bytes:
        return b"".join(self.buffers())

    def buffers(self) -> list:
        """The parts of :meth:`to_bytes` without joining them: header bytes, then views of the
        scales and data (copied to the host first when they live on a device)."""
        head = _HEAD.pack(
            MAGIC, (QUANT_CHANNEL if self.per_channel else QUANT) if self.bits else RAW, DTYPE_CODES[self.dtype],
            self.bits, len(self.shape),
            self.group_size, self.numel,
        ) + struct.pack(f"<{len(self.shape)}I", *self.shape)
        parts = [head]
        if self.scales is not None:
            parts.append(_host_view(self.scales.contiguous().view(torch.uint8)))
        parts.append(_host_view(self.data.contiguous()))
        return parts

    @classmethod
    def from_bytes(
        cls, buf: bytes | bytearray | memoryview, *, device: torch.device | str = "cpu", max_numel: int = DEFAULT_MAX_NUMEL
    ) -> "EncodedTensor":
        """Parse and validate one encoded tensor (the whole buffer). Raises InvalidRequestError."""
        mv = memoryview(buf)
        if len(mv) < _HEAD.size:
            raise InvalidRequestError(f"tensor message of {len(mv)} bytes is shorter than its header")
        magic, enc, dt, bits, ndim, group_size, numel = _HEAD.unpack_from(mv, 0)
        if magic != MAGIC:
            raise InvalidRequestError("tensor message has a wrong magic; the peer speaks another format")
        if enc not in (RAW, QUANT, QUANT_CHANNEL) or dt not in CODE_DTYPES or ndim > MAX_NDIM:
            raise InvalidRequestError(f"tensor message has unknown encoding {enc}, dtype {dt} or ndim {ndim}")
        off = _HEAD.size + 4 * ndim
        if len(mv) < off:
            raise InvalidRequestError("tensor message is truncated inside its shape")
        shape = struct.unpack_from(f"<{ndim}I", mv, _HEAD.size)
        if math.prod(shape) != numel:
            raise InvalidRequestError(f"tensor message shape {shape} does not hold numel {numel}")
        if numel > max_numel:
            raise InvalidRequestError(f"tensor of {numel} values exceeds the limit of {max_numel}")
        dtype = CODE_DTYPES[dt]
        if enc == RAW:
            if bits != 0:
                raise InvalidRequestError("raw tensor message must carry bits = 0")
            want = numel * torch.empty((), dtype=dtype).element_size()
            if len(mv) - off != want:
                raise InvalidRequestError(f"raw tensor payload is {len(mv) - off} bytes, expected {want}")
            data = torch.frombuffer(bytearray(mv[off:]), dtype=torch.uint8) if want else torch.empty(0, dtype=torch.uint8)
            values = data.view(dtype)
            if values.numel() and not all_finite(values):
                raise InvalidRequestError("tensor message holds NaN or Inf")
            return cls(shape=tuple(shape), dtype=dtype, bits=0, group_size=0, data=data.to(device))
        try:
            q.check_bits(bits)
            q.check_group_size(group_size)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"tensor message: {exc}") from exc
        if enc == QUANT_CHANNEL:
            if ndim == 0 or numel == 0 or group_size != _channel_group(numel, shape[-1]):
                raise InvalidRequestError(
                    f"per-channel tensor message of shape {shape} must use groups of the padded row count"
                )
            ng = shape[-1]
            want_codes = ng * group_size * bits // 8
        else:
            ng = q.num_groups(numel, group_size)
            want_codes = q.packed_nbytes(numel, bits, group_size)
        want_scales = 4 * ng
        if len(mv) - off != want_scales + want_codes:
            raise InvalidRequestError(
                f"quantized payload is {len(mv) - off} bytes, expected {want_scales + want_codes} "
                f"for {numel} values at {bits} bits in groups of {group_size}"
            )
        raw = torch.frombuffer(bytearray(mv[off:]), dtype=torch.uint8)
        scales = raw[:want_scales].view(torch.bfloat16).view(ng, 2)
        sf = scales.float()
        if not bool(torch.isfinite(sf).all()) or bool((sf[:, 1] < 0).any()):
            raise InvalidRequestError("tensor message has NaN/Inf or negative scales")
        return cls(
            shape=tuple(shape), dtype=dtype, bits=bits, group_size=group_size,
            data=raw[want_scales:].to(device), scales=scales.to(device), per_channel=enc == QUANT_CHANNEL,
        )


def encode_tensor(
    x: torch.Tensor,
    *,
    bits: int | None,
    group_size: int = 128,
    per_channel: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> EncodedTensor:
    """Raw (``bits=None``) or quantized encoding of ``x``: groups of ``group_size`` consecutive
    values, or with ``per_channel`` one group per channel of the last dimension. Raises
    InvalidRequestError on NaN/Inf."""
    x = x.detach()
    dtype = x.dtype if x.dtype in DTYPE_CODES else torch.float32
    if bits is None:
        if not all_finite(x):
            raise InvalidRequestError("cannot send a tensor holding NaN or Inf; check the model for divergence")
        data = x.to(dtype).contiguous().view(-1).view(torch.uint8)
        return EncodedTensor(shape=tuple(x.shape), dtype=dtype, bits=0, group_size=0, data=data)
    if per_channel and x.dim() >= 1 and x.numel() > 0:
        C = x.shape[-1]
        N = x.numel() // C
        Np = _channel_group(x.numel(), C)
        cols = x.reshape(N, C).t()  # (C, N): each channel contiguous
        if Np != N:  # pad with the channel's first value: the range and codes of real values unchanged
            cols = torch.cat([cols, cols[:, :1].expand(C, Np - N)], dim=1)
        packed, lo, scale = backends.quantize_pack(
            cols.contiguous(), bits, Np, stochastic=stochastic, generator=generator, backend=backend
        )
        scales = torch.stack([lo, scale], dim=1).to(torch.bfloat16)
        return EncodedTensor(shape=tuple(x.shape), dtype=dtype, bits=bits, group_size=Np, data=packed,
                             scales=scales, per_channel=True)
    packed, lo, scale = backends.quantize_pack(
        x, bits, group_size, stochastic=stochastic, generator=generator, backend=backend
    )
    scales = torch.stack([lo, scale], dim=1).to(torch.bfloat16)  # exact: both are bf16 values
    return EncodedTensor(shape=tuple(x.shape), dtype=dtype, bits=bits, group_size=group_size, data=packed, scales=scales)


def decode_tensor(
    enc: EncodedTensor, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None, backend: str = "auto"
) -> torch.Tensor:
    """The tensor (its original shape) in ``dtype`` (default: the encoded dtype)."""
    dtype = dtype or enc.dtype
    data = enc.data if device is None else enc.data.to(device)
    if enc.bits == 0:
        return data.view(enc.dtype).view(enc.shape).to(dtype)
    scales = enc.scales if device is None else enc.scales.to(device)
    sf = scales.float()
    lo, scale = sf[:, 0].contiguous(), sf[:, 1].contiguous()
    out_dtype = dtype if dtype in (torch.float32, torch.float16) else torch.float32
    if enc.per_channel:
        C, Np = enc.shape[-1], enc.group_size
        flat = backends.unpack_dequantize(data, lo, scale, C * Np, enc.bits, Np, out_dtype=out_dtype, backend=backend)
        cols = flat.view(C, Np)[:, : enc.numel // C]
        return cols.t().reshape(enc.shape).to(dtype)
    flat = backends.unpack_dequantize(
        data, lo, scale, enc.numel, enc.bits, enc.group_size, out_dtype=out_dtype, backend=backend
    )
    return flat.view(enc.shape).to(dtype)


# exponent bits of each float format: all ones means Inf or NaN
_EXPONENT = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
             torch.bfloat16: (torch.int16, 0x7F80)}
_SMALL = 1 << 16  # elements: below this, torch's per-op overhead outweighs the work


def all_finite(x: torch.Tensor) -> bool:
    """True when no value of ``x`` is NaN or Inf. One reduction instead of a mask: the sum of
    finite values is finite unless it overflows, so only a non-finite sum (NaN/Inf present, or
    an overflow) pays for the exact check. A small host tensor (an inference step's hidden
    states) is checked exactly on its exponent bits with numpy instead: a few microseconds
    against two torch ops' dispatch."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    bits = _EXPONENT.get(x.dtype)
    if bits is not None and x.device.type == "cpu" and x.numel() <= _SMALL and x.is_contiguous():
        as_int, mask = bits
        a = x.view(as_int).numpy()
        return not bool(((a & mask) == mask).any())
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def _host_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of ``t`` on the host (no copy when it is already there)."""
    return memoryview(t.cpu().view(torch.uint8).numpy()).cast("B")


def _channel_group(numel: int, channels: int) -> int:
    """Group size of a per-channel encoding: rows per channel, padded to a multiple of 8."""
    rows = numel // max(1, channels)
    return max(8, -(-rows // 8) * 8)
