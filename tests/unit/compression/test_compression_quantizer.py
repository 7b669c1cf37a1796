"""Quantizer, bit packing, backends and the tensor wire format."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.compression import EncodedTensor, decode_tensor, encode_tensor
from swarm.compression import backends
from swarm.compression import quantizer as q
from swarm.errors import InvalidRequestError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@FAST
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([8, 16, 64, 128]),
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
    scale=st.sampled_from([1e-6, 1.0, 100.0]),
)
def test_round_trip_error_is_within_half_a_step(bits, group, values, scale):
    x = torch.tensor(values, dtype=torch.float32) * scale
    enc = encode_tensor(x, bits=bits, group_size=group, backend="torch")
    y = decode_tensor(enc, dtype=torch.float32, backend="torch")
    ng = q.num_groups(x.numel(), group)
    step = enc.scales.float()[:, 1].repeat_interleave(group)[: x.numel()]
    # half a step from rounding, plus float32 rounding of (x - lo) * inv and of code * scale + lo
    slack = 1e-5 * (x.abs() + step * (1 << bits)) + 1e-30
    assert bool(((y - x).abs() <= step / 2 + slack).all())
    # exact size accounting: header + 4 bytes of scales per group + dense codes
    assert enc.data.numel() == ng * group * bits // 8 == q.packed_nbytes(x.numel(), bits, group)
    assert enc.nbytes == len(enc.to_bytes()) == enc.header_nbytes + 4 * ng + ng * group * bits // 8


@FAST
@given(bits=st.integers(2, 8), nblocks=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, nblocks, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (nblocks * 8,), generator=gen, dtype=torch.int32).to(torch.uint8)
    packed = q.pack_codes(codes, bits)
    assert packed.numel() == nblocks * bits
    assert torch.equal(q.unpack_codes(packed, bits), codes)


def test_packing_layout_is_little_endian_blocks():
    codes = torch.arange(8, dtype=torch.uint8)  # 3 bits each: 0..7
    word = sum(i << (3 * i) for i in range(8))
    assert q.pack_codes(codes, 3).tolist() == list(word.to_bytes(3, "little"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_c_kernel_matches_torch_reference(dtype, bits):
    if backends.cpu_kernel() is None:
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(bits)
    for n in (77, 1000, 4096):
        x = (torch.randn(n, generator=gen) * 3 + 1).to(dtype)
        p1, lo1, s1 = backends.quantize_pack(x, bits, 64, backend="torch")
        p2, lo2, s2 = backends.quantize_pack(x, bits, 64, backend="c")
        assert torch.equal(p1, p2) and torch.equal(lo1, lo2) and torch.equal(s1, s2)
        for out in (torch.float32, torch.float16):
            a = backends.unpack_dequantize(p1, lo1, s1, n, bits, 64, out_dtype=out, backend="torch")
            b = backends.unpack_dequantize(p1, lo1, s1, n, bits, 64, out_dtype=out, backend="c")
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", range(2, 9))
def test_cuda_paths_match_cpu_reconstruction(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(10_000, generator=gen).half()
    enc_cpu = encode_tensor(x, bits=bits, backend="torch")
    enc_gpu = encode_tensor(x.cuda(), bits=bits)
    assert torch.equal(enc_cpu.scales, enc_gpu.scales.cpu())
    same = (enc_cpu.data == enc_gpu.data.cpu()).float().mean().item()
    assert same > 0.999  # rare ties may round differently; the reconstruction below is what must agree
    y_cpu = decode_tensor(enc_gpu.__class__(**{**_fields(enc_gpu), "data": enc_gpu.data.cpu(), "scales": enc_gpu.scales.cpu()}))
    y_gpu = decode_tensor(enc_gpu)
    assert torch.equal(y_cpu, y_gpu.cpu())


def _fields(enc):
    return {f: getattr(enc, f) for f in ("shape", "dtype", "bits", "group_size", "data", "scales")}


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.linspace(-1, 1, 64)
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros_like(x)
    reps = 400
    for _ in range(reps):
        acc += decode_tensor(encode_tensor(x, bits=2, group_size=64, stochastic=True, generator=gen))
    step = 2.0 / 3
    assert (acc / reps - x).abs().max() < 0.25 * step  # RTN error would reach step/2 on some values
    a = encode_tensor(x, bits=3, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = encode_tensor(x, bits=3, stochastic=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.data, b.data)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wire_round_trip_keeps_shape_dtype_and_values(dtype):
    x = torch.randn(3, 5, 40).to(dtype)
    for bits in (None, 2, 5, 8):
        enc = encode_tensor(x, bits=bits, group_size=32)
        back = EncodedTensor.from_bytes(enc.to_bytes())
        assert back.shape == (3, 5, 40) and back.dtype == dtype and back.bits == (bits or 0)
        y1, y2 = decode_tensor(enc), decode_tensor(back)
        assert y1.dtype == dtype and torch.equal(y1, y2)
        if bits is None:
            assert torch.equal(y1, x)


def test_nan_and_inf_are_refused_at_encode():
    for bad in (float("nan"), float("inf")):
        x = torch.ones(100)
        x[17] = bad
        for bits in (None, 4):
            for backend in ("torch", "auto"):
                with pytest.raises(InvalidRequestError):
                    encode_tensor(x, bits=bits, backend=backend)


def _corrupt(buf: bytes, offset: int, value: bytes) -> bytes:
    return buf[:offset] + value + buf[offset + len(value):]


def test_malformed_messages_are_rejected():
    good = encode_tensor(torch.randn(4, 16), bits=4, group_size=16).to_bytes()
    EncodedTensor.from_bytes(good)
    bad = [
        b"",
        good[:10],
        _corrupt(good, 0, b"XXXX"),
        _corrupt(good, 4, bytes([7])),  # unknown encoding
        _corrupt(good, 5, bytes([9])),  # unknown dtype
        _corrupt(good, 6, bytes([9])),  # 9 bits
        _corrupt(good, 6, bytes([1])),  # 1 bit
        _corrupt(good, 8, struct.pack("<I", 12)),  # group size not a multiple of 8
        _corrupt(good, 12, struct.pack("<Q", 65)),  # numel disagrees with shape
        good + b"\0",  # trailing byte
        good[:-1],  # truncated payload
        _corrupt(good, 28, b"\xc0\x7f"),  # first group's lo (after the 28-byte header) = bf16 NaN
    ]
    for buf in bad:
        with pytest.raises(InvalidRequestError):
            EncodedTensor.from_bytes(buf)
    raw = bytearray(encode_tensor(torch.randn(8), bits=None).to_bytes())
    raw[-4:] = np.float32(np.nan).tobytes()
    with pytest.raises(InvalidRequestError):
        EncodedTensor.from_bytes(bytes(raw))
    with pytest.raises(InvalidRequestError):
        EncodedTensor.from_bytes(good, max_numel=10)


def test_bf16_directed_rounding_brackets_the_value():
    x = torch.tensor([1.0001, -1.0001, 3.14159, -2.71828, 0.0, 1e-20, -1e-20, 65504.0], dtype=torch.float32)
    down, up = q.bf16_round_down(x.clone()), q.bf16_round_up(x.abs().clone())
    assert bool((down <= x).all()) and bool((up >= x.abs()).all())
    assert torch.equal(down.to(torch.bfloat16).float(), down) and torch.equal(up.to(torch.bfloat16).float(), up)


@pytest.mark.parametrize("rows", [1, 7, 16, 45])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_per_channel_scales(rows, bits):
    gen = torch.Generator().manual_seed(rows)
    # channels of very different magnitude: per-channel scales keep the small ones accurate
    x = torch.randn(rows, 24, generator=gen) * torch.logspace(-3, 2, 24)
    enc = encode_tensor(x, bits=bits, per_channel=True)
    assert enc.per_channel and enc.scales.shape == (24, 2) and enc.group_size == max(8, -(-rows // 8) * 8)
    back = EncodedTensor.from_bytes(enc.to_bytes())
    y = decode_tensor(back)
    assert back.per_channel and torch.equal(y, decode_tensor(enc)) and enc.nbytes == len(enc.to_bytes())
    step = enc.scales.float()[:, 1]  # per channel
    assert bool(((y - x).abs() <= step / 2 + 1e-5 * (x.abs() + step * (1 << bits))).all())
    bad = bytearray(enc.to_bytes())
    bad[8:12] = struct.pack("<I", enc.group_size + 8)  # group size that does not match the rows
    with pytest.raises(InvalidRequestError):
        EncodedTensor.from_bytes(bytes(bad))
