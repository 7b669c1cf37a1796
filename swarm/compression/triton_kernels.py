"""Triton kernels for the group quantizer on CUDA: fused quantize+pack and unpack+dequantize.

Same scheme and bits as :mod:`swarm.compression.quantizer`: divisions are IEEE round-to-nearest
(``div_rn``) and kernels launch with ``enable_fp_fusion=False`` so multiply and add round
separately, as in the torch reference and the C kernel. Importing this module never fails; use
:func:`available`.
"""

from __future__ import annotations

import torch

try:  # triton is optional: CPU-only installs never need it
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install that fails at import
    _HAVE_TRITON = False

_GROUP_ELEMS_PER_PROGRAM = 4096  # values per program: enough work per CTA to hide latency


def available() -> bool:
    return _HAVE_TRITON and torch.cuda.is_available()


if _HAVE_TRITON:

    @triton.jit
    def _quant_pack_kernel(
        x_ptr, out_ptr, lo_ptr, scale_ptr, n, ng,
        BITS: tl.constexpr, G: tl.constexpr, GPB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = pid * GPB + tl.arange(0, GPB)  # (GPB,) group indices
        blk = tl.arange(0, G // 8)  # (G/8,) 8-value blocks in a group
        j = tl.arange(0, 8)
        offs = g[:, None, None].to(tl.int64) * G + blk[None, :, None] * 8 + j[None, None, :]  # (GPB, G/8, 8)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mn = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)  # (GPB,)
        mx = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
        bad = tl.max(tl.max(tl.where(mask & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0), axis=2), axis=1)
        # lo: round min down to bfloat16 (on the float32 bit pattern)
        mb = mn.to(tl.int32, bitcast=True)
        mt = mb & -65536
        lo_bits = tl.where((mb < 0) & ((mb & 65535) != 0), mt + 65536, mt)
        lo = lo_bits.to(tl.float32, bitcast=True)
        levels = (1 << BITS) - 1
        s = tl.math.div_rn(mx - lo, tl.full((GPB,), levels, tl.float32))
        sb = s.to(tl.int32, bitcast=True)
        st = sb & -65536
        scale = tl.where((sb & 65535) != 0, st + 65536, st).to(tl.float32, bitcast=True)
        inv = tl.where(scale > 0, tl.math.div_rn(tl.full((GPB,), 1.0, tl.float32), scale), 0.0)
        t = (x - lo[:, None, None]) * inv[:, None, None]
        t = t + 0.5
        t = tl.minimum(t, levels * 1.0)
        codes = tl.where(mask, t.to(tl.int32), 0).to(tl.int64)
        words = tl.sum(codes << (j * BITS).to(tl.int64)[None, None, :], axis=2)  # (GPB, G/8)
        # byte b of each block's little-endian word; lanes b >= BITS are masked off
        byte = (words[:, :, None] >> (j * 8).to(tl.int64)[None, None, :]) & 255
        out_offs = (g[:, None, None].to(tl.int64) * (G // 8) + blk[None, :, None]) * BITS + j[None, None, :]
        gmask = g < ng
        tl.store(out_ptr + out_offs, byte.to(tl.uint8), mask=gmask[:, None, None] & (j[None, None, :] < BITS))
        lo = tl.where(bad > 0, float("nan"), lo)
        tl.store(lo_ptr + g, lo, mask=gmask)
        tl.store(scale_ptr + g, scale, mask=gmask)

    @triton.jit
    def _unpack_dequant_kernel(
        packed_ptr, lo_ptr, scale_ptr, out_ptr, n, ng,
        BITS: tl.constexpr, G: tl.constexpr, GPB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = pid * GPB + tl.arange(0, GPB)
        blk = tl.arange(0, G // 8)
        j = tl.arange(0, 8)
        gmask = g < ng
        in_offs = (g[:, None, None].to(tl.int64) * (G // 8) + blk[None, :, None]) * BITS + j[None, None, :]
        b = tl.load(packed_ptr + in_offs, mask=gmask[:, None, None] & (j[None, None, :] < BITS), other=0)
        words = tl.sum(b.to(tl.int64) << (j * 8).to(tl.int64)[None, None, :], axis=2)  # (GPB, G/8)
        codes = (words[:, :, None] >> (j * BITS).to(tl.int64)[None, None, :]) & ((1 << BITS) - 1)
        lo = tl.load(lo_ptr + g, mask=gmask, other=0.0)
        scale = tl.load(scale_ptr + g, mask=gmask, other=0.0)
        v = codes.to(tl.float32) * scale[:, None, None]
        v = v + lo[:, None, None]
        offs = g[:, None, None].to(tl.int64) * G + blk[None, :, None] * 8 + j[None, None, :]
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=offs < n)


def _gpb(group_size: int) -> int:
    return max(1, _GROUP_ELEMS_PER_PROGRAM // group_size)


def quantize_pack(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused quantize+pack of a CUDA tensor (fp32/fp16/bf16). Same contract as backends.quantize_pack."""
    from swarm.errors import InvalidRequestError

    x = x.contiguous().view(-1)
    n = x.numel()
    ng = max(1, -(-n // group_size))
    out = torch.empty(ng * group_size * bits // 8, dtype=torch.uint8, device=x.device)
    lo = torch.empty(ng, dtype=torch.float32, device=x.device)
    scale = torch.empty(ng, dtype=torch.float32, device=x.device)
    gpb = _gpb(group_size)
    grid = (triton.cdiv(ng, gpb),)
    _quant_pack_kernel[grid](x, out, lo, scale, n, ng, BITS=bits, G=group_size, GPB=gpb, enable_fp_fusion=False)
    if not bool(torch.isfinite(lo).all()) or not bool(torch.isfinite(scale).all()):
        raise InvalidRequestError("cannot quantize a tensor holding NaN or Inf; check the model for divergence")
    return out, lo, scale


def quantize_pack_unchecked(x: torch.Tensor, bits: int, group_size: int, out, lo, scale) -> None:
    """The kernel alone, into preallocated buffers, without the host-side NaN check (benchmarks)."""
    n = x.numel()
    ng = lo.numel()
    gpb = _gpb(group_size)
    _quant_pack_kernel[(triton.cdiv(ng, gpb),)](
        x, out, lo, scale, n, ng, BITS=bits, G=group_size, GPB=gpb, enable_fp_fusion=False
    )


def unpack_dequantize(
    packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, numel: int, bits: int, group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    ng = lo.numel()
    out = torch.empty(numel, dtype=out_dtype, device=packed.device)
    gpb = _gpb(group_size)
    _unpack_dequant_kernel[(triton.cdiv(ng, gpb),)](
        packed, lo.float().contiguous(), scale.float().contiguous(), out, numel, ng,
        BITS=bits, G=group_size, GPB=gpb, enable_fp_fusion=False,
    )
    return out
