"""Boundary codecs as nodes build them: RAM and disk (memmap) AQ-SGD state give the same bytes."""

import torch

from swarm.compression import CodecMessage, CodecSpec
from swarm.pipeline.codecs import make_codec, simulated_boundary


def _pair(spec, **kw):
    common = dict(boundary=1, key="job:data", num_samples=16, row_shape=(4, 8), **kw)
    spec = CodecSpec.parse(spec)
    up = make_codec(spec, side="up", **{k: v for k, v in common.items() if k != "storage"},
                    storage=kw.get("storage", "ram"))
    down = make_codec(spec, side="down", **{k: v for k, v in common.items() if k != "storage"},
                      storage=kw.get("storage", "ram"))
    return up, down


def test_ram_and_memmap_state_send_identical_bytes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 8, generator=gen) for _ in range(4)]
    sent = {}
    for where in ("ram", str(tmp_path / "cache")):
        up, down = _pair("aqsgd:fw=2,bw=4", storage=where)
        out = []
        for i, x in enumerate(xs):
            ids = [3, 5] if i % 2 == 0 else [5, 7]  # revisits: deltas after the first visit
            msg = up.encode_forward(x, ids).to_bytes()
            down.decode_forward(CodecMessage.from_bytes(msg), ids)
            out.append(msg)
        sent[where == "ram"] = out
    assert sent[True] == sent[False]
    assert len(sent[True][2]) < len(sent[True][0]) / 2  # 2-bit deltas (plus headers), not raw first visits


def test_none_boundary_is_exact_and_backward_direct_is_close():
    x = torch.randn(2, 4, 8)
    b = simulated_boundary(CodecSpec.parse("none"), boundary=0, key="k", num_samples=8, row_shape=(4, 8))
    assert torch.equal(b.forward(x, [0, 1], 0), x) and torch.equal(b.backward(x, [0, 1], 0), x)
    d = simulated_boundary(CodecSpec.parse("direct:fw=8,bw=8"), boundary=0, key="k", num_samples=8, row_shape=(4, 8))
    assert torch.allclose(d.forward(x, [0, 1], 0), x, atol=0.05)
