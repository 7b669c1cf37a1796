"""Decode steps with fixed shapes (StageModel.decode_fixed) and their CUDA graphs (swarm/inference/graphs.py).

decode_fixed runs on every device, so its equality with the ordinary cached forward is checked
on the CPU here; the graphs themselves need a GPU (the CUDA tests run on the project's H200
benchmark machine, skipped elsewhere)."""

from __future__ import annotations

import gc

import pytest
import torch

from swarm.inference.graphs import DecodeGraphs, graphs_enabled
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.model import build_stage
from swarm.model.kv_cache import KVCache

from tests.unit.model.test_kv_cache_span import _config  # the same tiny configs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _two_rows(model, device, a, b):
    """A batch cache of two sessions at 7 and 2 tokens (rows of different lengths)."""
    ca = model.new_kv_cache(batch_size=1, max_length=40, device=device)
    cb = model.new_kv_cache(batch_size=1, max_length=40, device=device)
    model(a[:, :7].to(device), kv_cache=ca)
    model(b[:, :2].to(device), kv_cache=cb)
    return KVCache.cat([ca, cb])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ends", [(0, 3, True, True), (0, 2, True, False), (1, 3, False, True)])
def test_decode_fixed_equals_the_cached_forward(family, ends):
    first, last, is_first, is_last = ends
    cfg = _config(family)
    model = build_stage(cfg, first, last, is_first=is_first, is_last=is_last, seed=5)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 61, (1, 12), generator=g), torch.randint(0, 61, (1, 12), generator=g)
    with torch.no_grad():
        if is_first:
            eager, fixed = _two_rows(model, "cpu", a, b), _two_rows(model, "cpu", a, b)
            inputs = [torch.stack([a[:, 7 + t], b[:, 2 + t]]).view(2, 1) for t in range(4)]
        else:  # hidden states in: prefill with random hidden rows
            h = torch.randn(2, 12, cfg.hidden_size, generator=g)
            eager, fixed = (KVCache.cat([model.new_kv_cache(batch_size=1, max_length=40) for _ in range(2)])
                            for _ in range(2))
            for c in (eager, fixed):
                model(h[:, :5], kv_cache=c)  # both rows at 5
            inputs = [h[:, 5 + t:6 + t] for t in range(4)]
        for x in inputs:
            want = model(x, kv_cache=eager)
            got = model.decode_fixed(x, fixed)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(eager.lengths, fixed.lengths)
        for k1, k2 in zip(eager.keys + eager.values, fixed.keys + fixed.values):
            torch.testing.assert_close(k1, k2, atol=1e-6, rtol=1e-6)


def test_graphs_are_off_on_the_cpu_and_when_asked(monkeypatch):
    assert not graphs_enabled(torch.device("cpu"))
    monkeypatch.setenv("SWARM_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"))
    monkeypatch.delenv("SWARM_CUDA_GRAPHS")
    assert graphs_enabled(torch.device("cuda"))


@CUDA
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_graph_replays_equal_eager_steps(family):
    cfg = _config(family)
    model = build_stage(cfg, 0, 3, seed=7).cuda().eval()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 61, (1, 20), generator=g), torch.randint(0, 61, (1, 20), generator=g)
    graphs = DecodeGraphs(model)
    with torch.inference_mode():
        eager, graphed = _two_rows(model, "cuda", a, b), _two_rows(model, "cuda", a, b)
        both = torch.ones(2, dtype=torch.long, device="cuda")
        for t in range(8):
            x = torch.stack([a[:, 7 + t], b[:, 2 + t]]).view(2, 1).cuda()
            want = model(x, kv_cache=eager)
            got = graphs.step(graphed, x, both)  # the first step records (and runs) the graph
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert graphs.captures == 1 and graphs.replays == 7
    assert torch.equal(eager.lengths, graphed.lengths)


@CUDA
def test_a_dead_cache_never_gets_its_graph_replayed():
    model = build_stage(_config("llama"), 0, 3, seed=8).cuda().eval()
    graphs = DecodeGraphs(model)
    x = torch.tensor([[3]], device="cuda")
    one = torch.ones(1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        cache = model.new_kv_cache(batch_size=1, max_length=40)
        model(torch.tensor([[1, 2]], device="cuda"), kv_cache=cache)
        for _ in range(3):
            graphs.step(cache, x, one)
        assert graphs.captures == 1 and graphs.replays == 2
        del cache
        gc.collect()
        fresh = model.new_kv_cache(batch_size=1, max_length=40)  # may reuse the dead cache's id
        model(torch.tensor([[1, 2]], device="cuda"), kv_cache=fresh)
        graphs.step(fresh, x, one)  # a new cache gets its own graph, whatever its id
        assert graphs.captures == 2 and graphs.replays == 2
        assert int(fresh.lengths[0]) == 3


@CUDA
def test_a_runtime_with_graphs_decodes_the_same_tokens(monkeypatch):
    cfg = _config("llama")
    prompts = {"a": [5, 17, 42, 7, 9], "b": [3, 1, 4]}

    def decode(graphs_on: bool) -> dict[str, list[int]]:
        monkeypatch.setenv("SWARM_CUDA_GRAPHS", "1" if graphs_on else "0")
        rt = StageRuntime(build_stage(cfg, 0, 3, seed=9).cuda(), max_seq_len=40, max_sessions=4)
        out = {sid: [] for sid in prompts}
        entries = [StepEntry(session_id=sid, start_position=0, num_tokens=len(p), token_ids=tuple(p))
                   for sid, p in prompts.items()]
        for _ in range(10):
            tokens = rt.run_and_sample(entries)
            for e, t in zip(entries, tokens):
                out[e.session_id].append(t)
            entries = [StepEntry(session_id=e.session_id, start_position=e.start_position + e.num_tokens,
                                 num_tokens=1, token_ids=(t,)) for e, t in zip(entries, tokens)]
        assert (rt._slots.graphs is not None) == graphs_on
        if graphs_on:
            assert rt._slots.graphs.captures == 1 and rt._slots.graphs.replays == 8
        return out

    assert decode(True) == decode(False)


@CUDA
def test_graphs_keep_working_as_sessions_come_and_go():
    """A closed session's row of the slot cache (and its bucket's graph) serves the next session:
    one capture, replays from the next sessions' first decode step; a slot cache dropped (an idle
    stage) gets a new graph (a memory pool shared by all graphs failed that second capture with an
    allocator assert in torch 2.13)."""
    rt = StageRuntime(build_stage(_config("llama"), 0, 3, seed=10).cuda(), max_seq_len=40, max_sessions=2)
    for n in range(4):
        sid = f"s{n}"
        entries = [StepEntry(session_id=sid, start_position=0, num_tokens=3, token_ids=(1, 2, 3))]
        for _ in range(5):
            tokens = rt.run_and_sample(entries)
            e = entries[0]
            entries = [StepEntry(session_id=sid, start_position=e.start_position + e.num_tokens, num_tokens=1,
                                 token_ids=(tokens[0],))]
        rt.close([sid])
        gc.collect()
    stats = rt.graph_stats
    assert stats["graphs_on"], stats
    assert stats["graph_captures"] == 1 and stats["graph_replays"] == 3 + 4 * 3, stats
    rt._slots.clear()  # the cache is gone: the next session needs a new graph, captured as well
    gc.collect()
    entries = [StepEntry(session_id="z", start_position=0, num_tokens=3, token_ids=(1, 2, 3))]
    for _ in range(5):
        tokens = rt.run_and_sample(entries)
        entries = [StepEntry(session_id="z", start_position=entries[0].start_position + entries[0].num_tokens,
                             num_tokens=1, token_ids=(tokens[0],))]
    assert rt.graph_stats["graphs_on"] and rt.graph_stats["graph_captures"] == 2, rt.graph_stats
