"""CodecSpec's bytes per value (what the planner prices) match what the real codec sends."""

import pytest
import torch

from swarm.compression import CodecSpec
from swarm.pipeline.codecs import make_codec


@pytest.mark.parametrize("text, forward, backward", [
    ("none", 4.0, 4.0),
    ("direct:fw=4,bw=8", 0.5 + 4 / 128, 1.0 + 4 / 128),
    ("aqsgd:fw=2,bw=4", 0.25 + 4 / 128, 0.5 + 4 / 128),
    ("aqsgd:bw=4", 0.5 + 4 / 128, 0.5 + 4 / 128),  # fw defaults to 4 bits; bw is priced too
    ("direct:fw=8,bw=raw,g=64", 1.0 + 4 / 64, 4.0),
])
def test_bytes_per_value_are_pinned(text, forward, backward):
    spec = CodecSpec.parse(text)
    assert spec.forward_bytes_per_value() == forward
    assert spec.backward_bytes_per_value() == backward


def test_aqsgd_first_visit_is_raw_or_first_bits_and_none_follows_the_dtype():
    assert CodecSpec.parse("aqsgd:fw=2,bw=4").forward_bytes_per_value(steady=False) == 4.0
    assert CodecSpec.parse("aqsgd:fw=2,bw=4,first=8").forward_bytes_per_value(steady=False) == 1.0 + 4 / 128
    assert CodecSpec.parse("none").forward_bytes_per_value(raw_bytes=2.0) == 2.0
    with pytest.raises(Exception, match="rows"):
        CodecSpec.parse("direct:fw=4,bw=8,g=channel").forward_bytes_per_value()


@pytest.mark.parametrize("text", ["none", "direct:fw=4,bw=8", "aqsgd:fw=2,bw=4", "aqsgd:bw=4", "aqsgd:fw=3,bw=raw,first=6",
                                  "direct:fw=4,bw=8,g=channel"])
def test_formula_equals_the_encoded_payload(text):
    spec = CodecSpec.parse(text)
    B, S, H = 2, 8, 128  # one micro-batch (B, S, H): whole groups of 128
    rows = B * S
    up = make_codec(spec, side="up", boundary=0, key="j:d", num_samples=4, row_shape=(S, H))
    down = make_codec(spec, side="down", boundary=0, key="j:d", num_samples=4, row_shape=(S, H))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, H, generator=gen)
    first = up.encode_forward(x, [0, 1])
    later = up.encode_forward(x + 0.1 * torch.randn(B, S, H, generator=gen), [0, 1])
    grad = down.encode_backward(torch.randn(B, S, H, generator=gen), [0, 1])
    n = B * S * H
    assert first.payload_nbytes == n * spec.forward_bytes_per_value(steady=False, rows=rows)
    assert later.payload_nbytes == n * spec.forward_bytes_per_value(rows=rows)
    assert grad.payload_nbytes == n * spec.backward_bytes_per_value(rows=rows)
    # the headers the per-value figures leave out: SWC1 20 + 9 per sample + 8, SWT1 20 + 4 per dim per part
    assert later.nbytes - later.payload_nbytes == 20 + 9 * B + 8 + (20 + 4 * 3)
