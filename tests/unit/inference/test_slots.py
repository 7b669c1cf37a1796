"""The slot cache (swarm/inference/slots.py): sessions in fixed rows, decode steps over buckets of
rows whose idle rows compute but must change nothing. On the CPU with ``slots=True`` (the path a
GPU takes, without the CUDA graph, which replays the same ``decode_fixed``)."""

from __future__ import annotations

import pytest
import torch

from swarm.clock import FakeClock
from swarm.errors import CapacityError
from swarm.inference.sampling import SamplingParams
from swarm.inference.slots import FIRST_CAPACITY, bucket, slots_wanted
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # a short position limit: a full session's idle row then sits at the scratch position, past it
    config = make_tiny_checkpoint(path, request.param, num_layers=3, hidden_size=32, num_heads=4,
                                  max_position_embeddings=24)
    return path, config


def runtime(path, n, *, slots=True, max_sessions=4, max_seq_len=24, **kw) -> StageRuntime:
    stage = load_stage(path, 0, n, is_first=True, is_last=True)
    return StageRuntime(stage, max_seq_len=max_seq_len, max_sessions=max_sessions, slots=slots, **kw)


class Driver:
    """Greedy sessions stepped by hand: ``step(ids)`` runs one step of those sessions (a prefill for
    a new one, else one token) and records each token."""

    def __init__(self, rt: StageRuntime, prompts: dict[str, list[int]]) -> None:
        self.rt, self.prompts = rt, prompts
        self.pos = {sid: 0 for sid in prompts}
        self.last: dict[str, int | None] = {sid: None for sid in prompts}
        self.out: dict[str, list[int]] = {sid: [] for sid in prompts}

    def step(self, ids: list[str]) -> None:
        entries = []
        for sid in ids:
            toks = tuple(self.prompts[sid]) if self.last[sid] is None else (self.last[sid],)
            entries.append(StepEntry(session_id=sid, start_position=self.pos[sid], num_tokens=len(toks), token_ids=toks,
                                     sampling=SamplingParams(max_new_tokens=64)))
        for e, t in zip(entries, self.rt.run_and_sample(entries)):
            self.pos[e.session_id] += e.num_tokens
            self.last[e.session_id] = t
            self.out[e.session_id].append(t)


def alone(path, n, prompt: list[int], steps: int) -> list[int]:
    d = Driver(runtime(path, n, slots=False), {"x": prompt})
    for _ in range(steps):
        d.step(["x"])
    return d.out["x"]


def test_buckets_are_powers_of_two_within_capacity():
    assert [bucket(k, 8) for k in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket(5, 6) == 6 and bucket(1, 1) == 1


def test_sessions_that_sit_out_steps_keep_their_cache_and_tokens(ckpt):
    """Rows of a bucket that take no part in a step compute anyway: their caches must not move."""
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, n)
    d = Driver(rt, {"a": [5, 17, 42], "b": [9, 3, 1, 4], "c": [7]})
    d.step(["a", "b", "c"])
    d.step(["a", "b", "c"])
    kv_b, len_b = rt.export_kv("b")
    for _ in range(5):  # b sits out; a and c decode over the bucket of 4 rows that holds b's row
        d.step(["a", "c"])
    kv_b2, len_b2 = rt.export_kv("b")
    assert len_b2 == len_b and torch.equal(kv_b2, kv_b)
    for _ in range(4):
        d.step(["a", "b", "c"])
    for sid, steps in (("a", 11), ("b", 6), ("c", 11)):
        assert d.out[sid] == alone(path, n, d.prompts[sid], steps), sid


def test_a_full_session_idle_in_the_bucket_writes_only_the_scratch_position(ckpt):
    """A session at the served length (here also the model's position limit) cannot step again,
    but its row still rides in the others' decode steps: its keys and values stay as they were,
    and the others' tokens are right (a write past the cache, or a position past the model's
    embeddings, would fail or corrupt)."""
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, n, max_seq_len=24)
    prompt = list(range(1, 24))  # 23 tokens: the first token makes 24, the served length
    d = Driver(rt, {"full": prompt, "b": [3, 1]})
    d.step(["full", "b"])
    d.step(["full"])  # 24 positions: full
    assert rt.session_length("full") == 24
    kv, length = rt.export_kv("full")
    for _ in range(6):
        d.step(["b"])
    assert torch.equal(rt.export_kv("full")[0], kv)
    assert d.out["b"] == alone(path, n, [3, 1], 7)
    with pytest.raises(Exception, match="past the served context"):
        d.step(["full"])


def test_the_cache_grows_past_its_first_rows_and_keeps_every_session(ckpt):
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, n, max_sessions=FIRST_CAPACITY + 4)
    prompts = {f"s{i}": [i + 1, 2 * i + 3] for i in range(FIRST_CAPACITY + 3)}
    d = Driver(rt, prompts)
    started: list[str] = []
    for sid in prompts:  # one new session per step: the cache grows while the others decode
        started.append(sid)
        d.step(started)
    assert rt._slots.capacity == min(2 * FIRST_CAPACITY, FIRST_CAPACITY + 4)
    for _ in range(3):
        d.step(started)
    for i, sid in enumerate(started):
        assert d.out[sid] == alone(path, n, prompts[sid], len(started) - i + 3), sid
    for extra in ("x1", "late"):  # the 12th session fits; a 13th is past max_sessions
        d.prompts[extra], d.pos[extra], d.last[extra], d.out[extra] = [1], 0, None, []
    d.step(["x1"])
    with pytest.raises(CapacityError):
        d.step(["late"])


def test_rows_are_reused_lowest_first_and_an_idle_stage_gives_its_memory_back(ckpt):
    path, cfg = ckpt
    n = cfg.num_layers
    clock = FakeClock()
    rt = runtime(path, n, session_timeout_s=10.0, clock=clock)
    d = Driver(rt, {"a": [1, 2], "b": [3, 4], "c": [5]})
    d.step(["a", "b"])
    d.step(["a", "b"])
    assert [rt._sessions[s].slot for s in ("a", "b")] == [0, 1]
    rt.close(["a"])
    d.step(["c"])  # takes a's row, emptied: its tokens are a fresh session's
    assert rt._sessions["c"].slot == 0
    for _ in range(3):
        d.step(["b", "c"])
    assert d.out["c"] == alone(path, n, [5], 4)
    clock.advance(11)
    assert sorted(rt.expire()) == ["b", "c"]
    assert rt.kv_cache_bytes() == 0 and rt._slots.capacity == 0


def test_kv_export_and_import_between_slot_and_group_runtimes(ckpt):
    """A hand-off's layout is the same whichever way each end keeps its rows."""
    path, cfg = ckpt
    n = cfg.num_layers
    want = alone(path, n, [8, 6, 4], 9)
    for src_slots, dst_slots in ((True, False), (False, True), (True, True)):
        src = runtime(path, n, slots=src_slots)
        d = Driver(src, {"s": [8, 6, 4], "other": [2]})
        d.step(["other", "s"])
        for _ in range(3):
            d.step(["s", "other"])
        kv, length = src.export_kv("s")
        dst = runtime(path, n, slots=dst_slots)
        Driver(dst, {"z": [1]}).step(["z"])  # the imported session is not in row 0
        dst.import_kv("s", kv)
        d.rt = dst
        for _ in range(5):
            d.step(["s"])
        assert d.out["s"] == want, (src_slots, dst_slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_on_cuda_graph_replays_give_the_tokens_of_eager_steps_while_sessions_come_and_go(ckpt):
    """The GPU path for real: each bucket recorded once, replayed while sessions join, sit out,
    leave and reuse rows; the tokens are those of the CPU-style groups run eagerly on the device."""
    path, cfg = ckpt
    n = cfg.num_layers
    stage = lambda: load_stage(path, 0, n, is_first=True, is_last=True, device="cuda")  # noqa: E731
    graphs = StageRuntime(stage(), max_seq_len=24, max_sessions=6, slots=True)
    eager = StageRuntime(stage(), max_seq_len=24, max_sessions=6, slots=False)
    prompts = {f"s{i}": [i + 2, 3 * i + 1, 7] for i in range(6)}
    runs = {name: Driver(rt, dict(prompts)) for name, rt in (("graphs", graphs), ("eager", eager))}
    plan = [["s0"], ["s0", "s1"], ["s0", "s1", "s2"], ["s1", "s2"], ["s0", "s1", "s2", "s3", "s4"],
            ["s0", "s2", "s4"], ["s0", "s1", "s2", "s3", "s4"]] + [["s1", "s2", "s3", "s4", "s5"]] * 4
    for ids in plan:
        for d in runs.values():
            d.step(ids)
        if ids == plan[5]:
            for d in runs.values():
                d.rt.close(["s0"])
                d.pos["s0"], d.last["s0"], d.out["s0"] = 0, None, []  # s0 again, as a new session
    assert runs["graphs"].out == runs["eager"].out
    stats = graphs.graph_stats
    assert stats["graphs_on"] and stats["graph_replays"] > 0
    assert stats["graph_captures"] <= 4  # buckets of 1, 2, 4 and 6 rows: recorded once each


def test_moving_a_cache_into_more_rows_keeps_every_row_and_gives_the_old_tensors_up(ckpt):
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, n)
    d = Driver(rt, {"a": [4, 5, 6], "b": [7]})
    d.step(["a", "b"])
    d.step(["a", "b"])
    old = rt._slots.cache
    before = [t.clone() for t in old.keys + old.values]
    moved = old.moved_to_rows(old.batch_size + 3)
    assert old.keys == [] and old.values == []  # given up layer by layer
    assert moved.batch_size == old.lengths.shape[0] + 3 and moved.scratch_positions == 1
    for b, t in zip(before, moved.keys + moved.values):
        assert torch.equal(t[: b.shape[0]], b) and not t[b.shape[0]:].any()
    assert torch.equal(moved.lengths[:2], old.lengths[:2]) and not moved.lengths[2:].any()


def test_the_layout_follows_the_device_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("SWARM_SLOT_CACHE", raising=False)
    assert slots_wanted(torch.device("cuda")) and not slots_wanted(torch.device("cpu"))
    monkeypatch.setenv("SWARM_SLOT_CACHE", "1")
    assert slots_wanted(torch.device("cpu"))
    monkeypatch.setenv("SWARM_SLOT_CACHE", "0")
    assert not slots_wanted(torch.device("cuda"))
