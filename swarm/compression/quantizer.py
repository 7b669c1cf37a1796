"""k-bit group quantization (k = 2..8) with dense bit packing.

Scheme (the same in the torch, C and Triton paths): the tensor is flattened and cut into groups of
``group_size`` consecutive values (the last group may be partial; its missing values are ignored
and get code 0). Per group, ``lo`` = min rounded *down* to bfloat16 and ``scale`` =
(max - lo) / (2^k - 1) rounded *up* to bfloat16, so every value lies in [lo, lo + scale*(2^k-1)].
Codes are ``floor((x - lo) * (1/scale) + u)`` clamped to [0, 2^k - 1] with u = 0.5 (round to
nearest) or u ~ U[0, 1) (stochastic rounding, unbiased). Dequantisation is ``code * scale + lo``
in float32 as two separately rounded operations, so every device reconstructs the same bits.

Packing: each block of 8 codes becomes k bytes: code i occupies bits [k*i, k*i + k) of the
little-endian 8k-bit block. A tensor of n values (padded to whole groups) packs into exactly
``num_groups * group_size * k / 8`` bytes, plus 4 bytes of scales per group.
"""

from __future__ import annotations

import math

import torch

from swarm.errors import InvalidRequestError

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS):
        raise InvalidRequestError(f"quantization bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def check_group_size(group_size: int) -> None:
    if not (isinstance(group_size, int) and 8 <= group_size <= 1 << 20 and group_size % 8 == 0):
        raise InvalidRequestError(f"group_size must be a multiple of 8 in 8..{1 << 20}, got {group_size!r}")


def num_groups(numel: int, group_size: int) -> int:
    return max(1, math.ceil(numel / group_size))


def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes of packed codes (not scales) for ``numel`` values."""
    return num_groups(numel, group_size) * group_size * bits // 8


# -- bfloat16 directed rounding (on float32 bit patterns) -------------------------------------------
def bf16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest bfloat16 <= x (x finite float32), returned as float32."""
    bits = x.view(torch.int32)
    trunc = bits & ~0xFFFF  # toward zero
    exact = (bits & 0xFFFF) == 0
    neg = bits < 0
    # negative values not exactly representable: one more ulp away from zero
    stepped = torch.where(neg & ~exact, trunc + 0x10000, trunc)
    return stepped.view(torch.float32)


def bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 >= x (x finite, >= 0), returned as float32."""
    bits = x.view(torch.int32)
    trunc = bits & ~0xFFFF
    exact = (bits & 0xFFFF) == 0
    return torch.where(exact, trunc, trunc + 0x10000).view(torch.float32)


# -- reference (torch) quantize / pack ------------------------------------------------------------
def group_params(groups: torch.Tensor, numel: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, scale) float32 per group of ``groups`` (ng, G) float32 where only the first ``numel``
    values (row-major) are real."""
    ng, G = groups.shape
    pad = ng * G - numel
    if pad:
        last = groups[-1, : G - pad]
        lo = torch.cat([groups[:-1].amin(dim=1), last.amin().reshape(1)])
        hi = torch.cat([groups[:-1].amax(dim=1), last.amax().reshape(1)])
    else:
        lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    lo = bf16_round_down(lo.contiguous())
    # a tensor divisor: torch on CUDA turns division by a Python scalar into a multiplication by
    # its reciprocal, which rounds differently from the true division the kernels do
    levels = torch.full_like(hi, float((1 << bits) - 1))
    scale = bf16_round_up(((hi - lo) / levels).contiguous())
    return lo, scale


def quantize_codes(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference quantizer: (codes uint8 (ng*G,), lo float32 (ng,), scale float32 (ng,)).

    Raises InvalidRequestError when ``x`` holds NaN or Inf.
    """
    n = x.numel()
    ng = num_groups(n, group_size)
    flat = x.reshape(-1).float()
    if ng * group_size != n:
        flat = torch.nn.functional.pad(flat, (0, ng * group_size - n))
    groups = flat.view(ng, group_size)
    lo, scale = group_params(groups, n, bits)
    if not bool(torch.isfinite(lo).all() & torch.isfinite(scale).all()):
        raise InvalidRequestError("cannot quantize a tensor holding NaN or Inf; check the model for divergence")
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    t = (groups - lo[:, None]) * inv[:, None]
    if stochastic:
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=torch.float32)
        t = t + u
    else:
        t = t + 0.5
    codes = t.floor_().clamp_(0, (1 << bits) - 1).to(torch.uint8).view(-1)
    if ng * group_size != n:
        codes[n:] = 0
    return codes, lo, scale


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (length a multiple of 8, each < 2^bits) densely: k bytes per 8 codes."""
    if bits == 8:
        return codes.clone()
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte
        per = 8 // bits
        c = codes.view(-1, per).to(torch.int32)
        shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
        return (c << shifts).sum(dim=1).to(torch.uint8)
    c = codes.view(-1, 8).to(torch.int64)
    shifts = torch.arange(0, 8 * bits, bits, device=codes.device, dtype=torch.int64)
    words = (c << shifts).sum(dim=1)  # (nb,) little-endian 8k-bit blocks
    byte_shifts = torch.arange(0, 8 * bits, 8, device=codes.device, dtype=torch.int64)
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, 8 per ``bits`` bytes."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
        return ((packed.to(torch.int32)[:, None] >> shifts) & mask).to(torch.uint8).view(-1)
    b = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=torch.int64)
    words = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    return ((words[:, None] >> shifts) & mask).to(torch.uint8).view(-1)


def dequantize_codes(
    codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, numel: int, group_size: int
) -> torch.Tensor:
    """float32 values (numel,) from codes (ng*G,) and per-group lo/scale (ng,)."""
    ng = lo.shape[0]
    v = codes.view(ng, group_size).float() * scale.float()[:, None]
    v = v + lo.float()[:, None]  # a separate op: no fused multiply-add, same bits on every device
    return v.view(-1)[:numel]
