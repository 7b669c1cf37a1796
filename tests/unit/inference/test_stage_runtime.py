"""Stage runtime: a split model with per-session KV caches equals the whole model, batching too.
``slots``: the same behaviour with every session in a row of one slot cache (the GPU layout,
swarm/inference/slots.py; tests/unit/inference/test_slots.py has what is particular to it)."""

from __future__ import annotations

import pytest
import torch

from swarm.clock import FakeClock
from swarm.errors import CapacityError, InvalidRequestError
from swarm.inference.local import LocalChain, generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    config = make_tiny_checkpoint(path, request.param, num_layers=5, hidden_size=32, num_heads=4)
    return path, config


def runtime(path, first, last, n, **kw) -> StageRuntime:
    stage = load_stage(path, first, last, is_first=first == 0, is_last=last == n)
    return StageRuntime(stage, max_seq_len=kw.pop("max_seq_len", 96), max_sessions=kw.pop("max_sessions", 4), **kw)


SLOTS = pytest.mark.parametrize("slots", [False, True], ids=["groups", "slots"])


@SLOTS
def test_pipeline_equals_whole_model_greedy_and_sampled(ckpt, slots):
    path, cfg = ckpt
    n = cfg.num_layers
    whole = runtime(path, 0, n, n)
    chain = LocalChain([runtime(path, 0, 2, n, slots=slots), runtime(path, 2, 3, n, slots=slots),
                        runtime(path, 3, n, n, slots=slots)])
    prompt = [5, 17, 42, 7, 99, 3]
    for params in (SamplingParams(max_new_tokens=20), SamplingParams(temperature=0.8, top_k=50, seed=3, max_new_tokens=20)):
        ref = generate_local(whole.run_and_sample, prompt, params, session_id="a")
        got = generate_local(chain.step, prompt, params, session_id="a")
        assert got == ref
        whole.close(["a"])
        chain.close(["a"])


def test_matches_transformers_greedy(ckpt):
    transformers = pytest.importorskip("transformers")
    path, cfg = ckpt
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompt = [5, 17, 42, 7]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    want = out[0, len(prompt):].tolist()
    whole = runtime(path, 0, cfg.num_layers, cfg.num_layers)
    assert generate_local(whole.run_and_sample, prompt, SamplingParams(max_new_tokens=12)) == want


@SLOTS
def test_concurrent_sessions_batched_equal_alone(ckpt, slots):
    path, cfg = ckpt
    n = cfg.num_layers
    chain = LocalChain([runtime(path, 0, 3, n, slots=slots), runtime(path, 3, n, n, slots=slots)])
    whole = runtime(path, 0, n, n)
    prompts = {"s1": [1, 2, 3], "s2": [9, 8, 7, 6, 5], "s3": [11]}
    p = SamplingParams(max_new_tokens=10)
    refs = {sid: generate_local(whole.run_and_sample, pr, p, session_id=sid) for sid, pr in prompts.items()}
    # interleave: s1 and s2 start together, s3 joins later, s2 leaves early
    state = {sid: {"pos": 0, "last": None, "out": []} for sid in prompts}
    active = ["s1", "s2"]
    for step in range(14):
        if step == 3:
            active.append("s3")
        entries = []
        for sid in active:
            st = state[sid]
            if st["last"] is None:
                toks = tuple(prompts[sid])
            else:
                toks = (st["last"],)
            entries.append(StepEntry(session_id=sid, start_position=st["pos"], num_tokens=len(toks), token_ids=toks))
        toks = chain.step(entries)
        for e, t in zip(entries, toks):
            st = state[e.session_id]
            st["pos"] += e.num_tokens
            st["last"] = t
            st["out"].append(t)
        done = [sid for sid in active if len(state[sid]["out"]) >= 10]
        for sid in done:
            active.remove(sid)
        chain.close(done)
        if not active:
            break
    for sid in prompts:
        assert state[sid]["out"] == refs[sid], sid
    assert all(st.num_sessions == 0 for st in chain.stages)


@SLOTS
def test_bad_steps_are_refused_without_damage(ckpt, slots):
    path, cfg = ckpt
    n = cfg.num_layers
    first = runtime(path, 0, 2, n, max_sessions=1, slots=slots)
    first.run([StepEntry(session_id="a", start_position=0, num_tokens=2, token_ids=(1, 2))])
    with pytest.raises(InvalidRequestError, match="position"):
        first.run([StepEntry(session_id="a", start_position=5, num_tokens=1, token_ids=(1,))])
    with pytest.raises(InvalidRequestError, match="unknown"):
        first.run([StepEntry(session_id="b", start_position=3, num_tokens=1, token_ids=(1,))])
    with pytest.raises(CapacityError):
        first.run([StepEntry(session_id="c", start_position=0, num_tokens=1, token_ids=(1,))])
    with pytest.raises(InvalidRequestError, match="token ids"):
        first.run([StepEntry(session_id="a", start_position=2, num_tokens=1, token_ids=(10**6,))])
    with pytest.raises(InvalidRequestError, match="context"):
        first.run([StepEntry(session_id="a", start_position=2, num_tokens=95, token_ids=tuple([1] * 95))])
    assert first.session_length("a") == 2
    second = runtime(path, 2, n, n, slots=slots)
    with pytest.raises(InvalidRequestError, match="shape"):
        second.run([StepEntry(session_id="a", start_position=0, num_tokens=2)], torch.zeros(3, cfg.hidden_size))


@SLOTS
def test_idle_sessions_expire(ckpt, slots):
    path, cfg = ckpt
    clock = FakeClock()
    rt = runtime(path, 0, cfg.num_layers, cfg.num_layers, session_timeout_s=10.0, clock=clock, slots=slots)
    rt.run([StepEntry(session_id="a", start_position=0, num_tokens=1, token_ids=(1,))])
    clock.advance(5)
    assert rt.expire() == []
    clock.advance(6)
    assert rt.expire() == ["a"] and rt.num_sessions == 0 and rt.kv_cache_bytes() == 0


def test_alternating_groups_keep_their_batch_caches(ckpt):
    path, cfg = ckpt
    n = cfg.num_layers
    chain = LocalChain([runtime(path, 0, 2, n, max_sessions=4), runtime(path, 2, n, n, max_sessions=4)])
    whole = runtime(path, 0, n, n)
    prompts = {"a": [1, 2], "b": [3, 4, 5], "c": [6], "d": [7, 8, 9, 10]}
    p = SamplingParams(max_new_tokens=8)
    refs = {sid: generate_local(whole.run_and_sample, pr, p, session_id=sid) for sid, pr in prompts.items()}
    state = {sid: {"pos": 0, "last": None, "out": []} for sid in prompts}
    lanes = [["a", "b"], ["c", "d"]]  # two pipelined groups, stepped in turn
    for step in range(16):
        lane = lanes[step % 2]
        entries = []
        for sid in lane:
            st = state[sid]
            toks = tuple(prompts[sid]) if st["last"] is None else (st["last"],)
            entries.append(StepEntry(session_id=sid, start_position=st["pos"], num_tokens=len(toks), token_ids=toks))
        for e, t in zip(entries, chain.step(entries)):
            st = state[e.session_id]
            st["pos"] += e.num_tokens
            st["last"] = t
            st["out"].append(t)
        if step >= 4:
            assert all(len(s._groups.caches) == 2 for s in chain.stages)  # both batch caches kept
    for sid in prompts:
        assert state[sid]["out"] == refs[sid], sid


@SLOTS
def test_new_sessions_of_equal_prompt_length_prefill_as_one_batch(ckpt, slots):
    path, cfg = ckpt
    n = cfg.num_layers
    chain = LocalChain([runtime(path, 0, 2, n, max_sessions=4, slots=slots),
                        runtime(path, 2, n, n, max_sessions=4, slots=slots)])
    whole = runtime(path, 0, n, n)
    prompts = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [7], "d": [9, 8, 7]}  # a, b, d batch; c alone
    p = SamplingParams(max_new_tokens=6)
    refs = {sid: generate_local(whole.run_and_sample, pr, p, session_id=sid) for sid, pr in prompts.items()}
    out = {sid: [] for sid in prompts}
    entries = [StepEntry(session_id=sid, start_position=0, num_tokens=len(pr), token_ids=tuple(pr))
               for sid, pr in prompts.items()]
    for _ in range(6):
        toks = chain.step(entries)
        for e, t in zip(entries, toks):
            out[e.session_id].append(t)
        if _ == 0 and not slots:  # the equal-length prompts share one batch cache on every stage, already a decode group
            assert all(list(st._groups.caches) == [("a", "b", "d")] for st in chain.stages)
        entries = [StepEntry(session_id=e.session_id, start_position=e.start_position + e.num_tokens, num_tokens=1,
                             token_ids=(t,)) for e, t in zip(entries, toks)]
    assert out == refs


@SLOTS
def test_kept_rows_are_the_logits_each_row_gives_as_a_last_row(ckpt, slots):
    """run_keeping: the last stage's logits at chosen rows of a prefill (a spot check's replay)
    equal the logits a step ending at that row gives, alone and prefilled together (same length)."""
    path, cfg = ckpt
    n = cfg.num_layers
    whole = runtime(path, 0, n, n, max_sessions=8, slots=slots)
    ids = (5, 17, 42, 7, 99, 3, 11, 8)
    want = {r: whole.run([StepEntry(session_id=f"w{r}", start_position=0, num_tokens=r + 1, token_ids=ids[:r + 1])])[0]
            for r in (2, 5, 7)}
    entries = [StepEntry(session_id=s, start_position=0, num_tokens=len(ids), token_ids=ids) for s in ("a", "b")]
    out, kept = whole.run_keeping(entries, keep={0: [2, 5, 7], 1: [5]})
    torch.testing.assert_close(out[0], want[7], atol=1e-5, rtol=1e-5)
    for k, r in enumerate((2, 5, 7)):
        torch.testing.assert_close(kept[0][k], want[r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept[1][0], want[5], atol=1e-5, rtol=1e-5)


def _generate_batch(rt: StageRuntime, prompts: dict[str, list[int]], steps: int) -> dict[str, list[int]]:
    """Greedy tokens of sessions stepped together (prefill in one step, then decode steps)."""
    out = {sid: [] for sid in prompts}
    entries = [StepEntry(session_id=sid, start_position=0, num_tokens=len(p), token_ids=tuple(p),
                         sampling=SamplingParams(max_new_tokens=steps)) for sid, p in prompts.items()]
    for _ in range(steps):
        tokens = rt.run_and_sample(entries)
        for e, t in zip(entries, tokens):
            out[e.session_id].append(t)
        entries = [StepEntry(session_id=e.session_id, start_position=e.start_position + e.num_tokens, num_tokens=1,
                             token_ids=(t,), sampling=e.sampling) for e, t in zip(entries, tokens)]
    return out


def test_a_closed_sessions_cache_serves_the_next_session_and_leaks_nothing(ckpt):
    """Caches are reused (no allocation; a CUDA graph over a cache keeps replaying), emptied in
    between: the next sessions' tokens equal a fresh runtime's."""
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, 0, n, n, max_sessions=4)
    first = _generate_batch(rt, {"a": [5, 17, 42, 7]}, 6)
    cache = rt._sessions["a"].cache if rt._sessions["a"].cache is not None else rt._groups.caches[("a",)]
    rt.close(["a"])
    assert rt._pool.count(1) == 1 and rt._pool.holds(cache)
    again = _generate_batch(rt, {"b": [9, 3]}, 6)  # shorter prompt: stale positions must not be read
    reused = rt._sessions["b"].cache if rt._sessions["b"].cache is not None else rt._groups.caches[("b",)]
    assert reused is cache
    assert again == _generate_batch(runtime(path, 0, n, n), {"b": [9, 3]}, 6)
    assert first == _generate_batch(runtime(path, 0, n, n), {"a": [5, 17, 42, 7]}, 6)
    # a batch cache of sessions that prefilled together comes back for the next pair
    pair = {"c": [1, 2, 3], "d": [4, 5, 6]}
    want = _generate_batch(runtime(path, 0, n, n), pair, 5)
    assert _generate_batch(rt, pair, 5) == want
    batch = rt._groups.caches[("c", "d")]
    rt.close(["b", "c", "d"])
    assert rt._pool.holds(batch) and rt.num_sessions == 0
    pair2 = {"e": [7, 8, 9], "f": [1, 1, 1]}
    assert _generate_batch(rt, pair2, 5) == _generate_batch(runtime(path, 0, n, n), pair2, 5)
    assert rt._groups.caches[("e", "f")] is batch


def test_spare_caches_stay_within_max_sessions(ckpt):
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, 0, n, n, max_sessions=3)
    one = rt.kv_cache_bytes() or None
    for sid in ("a", "b", "c"):
        rt.run([StepEntry(session_id=sid, start_position=0, num_tokens=2, token_ids=(1, 2))])
    per_session = rt.kv_cache_bytes() // 3
    assert one is None and per_session > 0
    rt.close(["a", "b"])  # spare 2 + open 1 = 3: both kept, and counted
    assert rt._pool.count() == 2 and rt.kv_cache_bytes() == 3 * per_session
    for sid in ("d", "e"):  # take both spares back
        rt.run([StepEntry(session_id=sid, start_position=0, num_tokens=2, token_ids=(1, 2))])
    assert rt._pool.count() == 0 and rt.kv_cache_bytes() == 3 * per_session
    rt.close(["c", "d", "e"])
    assert rt.kv_cache_bytes() <= 3 * per_session


def test_closing_the_same_session_twice_in_one_call_closes_it_once(ckpt):
    """A session both finished and cancelled can be named twice in one close (the coordinator's
    closing list); a client may repeat ids too. It raised KeyError (CloseSession's internal error)."""
    path, cfg = ckpt
    n = cfg.num_layers
    rt = runtime(path, 0, n, n, max_sessions=3)
    for sid in ("a", "b"):
        rt.run([StepEntry(session_id=sid, start_position=0, num_tokens=2, token_ids=(1, 2))])
    assert rt.close(["a", "a", "zz", "b", "a"]) == 2 and rt.num_sessions == 0
