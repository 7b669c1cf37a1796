"""Framing and validation of tensors on the wire (swarm/transport/tensors.py)."""

import pytest
import torch

from swarm.errors import InvalidRequestError
from swarm.transport import tensors as wt


def _wire(t: torch.Tensor, **over) -> wt.WireTensor:
    payload = wt.raw_encode(t)
    fields = dict(
        job_id="job-1", step=3, micro_batch=1, sample_ids=(7, 8), shape=tuple(t.shape),
        dtype=wt.dtype_name(t.dtype), kind="activation", boundary=0, sender_id="node-a",
    )
    fields.update(over)
    return wt.WireTensor(header=wt.make_header(payload, **fields), payload=payload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_through_small_chunks(dtype):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 7, generator=gen).to(dtype)
    wire = _wire(t)
    chunks = list(wt.to_chunks(wire, chunk_bytes=16))
    assert len(chunks) > 3
    assert chunks[0].HasField("header") and not chunks[1].HasField("header")
    back = wt.from_chunks(chunks)
    assert back.header == wire.header
    out = wt.raw_decode(back.payload, shape=back.header.shape, dtype=back.header.dtype)
    assert out.dtype == dtype and torch.equal(out, t)


def test_corrupted_payload_is_rejected():
    chunks = list(wt.to_chunks(_wire(torch.ones(4, 4)), chunk_bytes=16))
    chunks[1].data = b"\x00" * len(chunks[1].data)
    with pytest.raises(InvalidRequestError, match="checksum"):
        wt.from_chunks(chunks)


def test_oversized_and_truncated_streams_are_rejected():
    chunks = list(wt.to_chunks(_wire(torch.ones(64)), chunk_bytes=32))
    with pytest.raises(InvalidRequestError, match="limit"):
        wt.from_chunks(chunks, max_payload_bytes=100)
    with pytest.raises(InvalidRequestError, match="announced"):
        wt.from_chunks(chunks[:-1])
    with pytest.raises(InvalidRequestError, match="header first"):
        wt.from_chunks(chunks[1:])
    with pytest.raises(InvalidRequestError, match="empty"):
        wt.from_chunks([])


def test_expectation_names_the_mismatching_field():
    h = _wire(torch.ones(2, 3)).header
    ok = wt.TensorExpectation(job_id="job-1", kind="activation", shape=(2, 3), dtype="float32", step=3,
                              micro_batch=1, sender_ids=frozenset({"node-a"}))
    wt.validate_header(h, ok)
    bad_cases = {
        "shape": dict(shape=(3, 2)), "dtype": dict(dtype="float16"), "step": dict(step=4),
        "job_id": dict(job_id="other"), "micro_batch": dict(micro_batch=0),
    }
    for name, over in bad_cases.items():
        exp = wt.TensorExpectation(**{**{f: getattr(ok, f) for f in ok.__slots__}, **over})
        with pytest.raises(InvalidRequestError, match=name):
            wt.validate_header(h, exp)
    with pytest.raises(InvalidRequestError, match="neighbour"):
        wt.validate_header(h, wt.TensorExpectation(job_id="job-1", kind="activation", sender_ids=frozenset({"x"})))


def test_raw_decode_checks_size_and_nan_check():
    with pytest.raises(InvalidRequestError, match="needs"):
        wt.raw_decode(b"\x00" * 10, shape=(2, 2), dtype="float32")
    with pytest.raises(InvalidRequestError, match="NaN"):
        wt.check_finite(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InvalidRequestError):
        wt.make_header(b"", job_id="", step=0, micro_batch=0, shape=(1,), dtype="float32", kind="activation")
