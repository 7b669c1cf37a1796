"""Kill a stage's process mid-generation: the stream completes with the same tokens."""

from __future__ import annotations

import time

import pytest
from tokenizers import Tokenizer

from swarm.errors import CapacityError, UnavailableError
from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import generate_events, node_proc, nodes_proc, wait_until
from tests.multiproc.inference.test_pipeline_generation import coordinator, reference

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(110)
def test_node_killed_mid_generation_replays_on_a_new_placement(tmp_path):
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "gpt2", num_layers=4, hidden_size=64, num_heads=4, seed=2)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompt = "A coordinator keeps the list of nodes"
    params = SamplingParams(max_new_tokens=90, temperature=0.8, top_k=50, seed=5)
    want = reference(d, tok.encode(prompt).ids, params, None)
    assert len(want) == 90
    with coordinator(tmp_path) as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]) as (n0, n1, n2):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 3, timeout_s=30)
        info = coord.serve(d, name="tiny", num_replicas=1, num_stages=3, max_seq_len=128)
        chain = [s["node_id"] for s in info["replicas"][0]["stages"]]
        procs = {n.node_id: n for n in (n0, n1, n2)}
        middle = procs[chain[1]]
        got: list[int] = []
        replays = 0
        t_kill = None
        for ev in generate_events(coord, model="tiny", prompt=prompt, params=params, timeout_s=90):
            got.extend(ev.token_ids)
            if len(got) >= 10 and t_kill is None:
                t_kill = time.monotonic()
                middle.proc.kill()
            if ev.finish_reason:
                replays = ev.num_replays
        assert t_kill is not None
        assert got == want[: len(got)] and len(got) == len(want)
        assert replays >= 1
        models = coord.models()
        new_chain = [s["node_id"] for s in models[0]["replicas"][0]["stages"]]
        assert middle.node_id not in new_chain and len(new_chain) == 2
        # no capacity left: the client gets a clear error, not a hang
        for nid in new_chain:
            procs[nid].proc.kill()
        t0 = time.monotonic()
        with pytest.raises((CapacityError, UnavailableError)):
            list(generate_events(coord, model="tiny", prompt=prompt, params=SamplingParams(max_new_tokens=5), timeout_s=60))
        assert time.monotonic() - t0 < 30


@pytest.mark.timeout(90)
def test_replica_killed_mid_generation_moves_to_the_other_replica(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=2, hidden_size=64, num_heads=4, seed=4)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompt = "Gradients flow back the same way"
    params = SamplingParams(max_new_tokens=80, temperature=0.7, seed=9)
    want = reference(d, tok.encode(prompt).ids, params, None)
    with coordinator(tmp_path) as coord, node_proc(coord, tmp_path / "n0") as n0, node_proc(coord, tmp_path / "n1") as n1:
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 2, timeout_s=30)
        info = coord.serve(d, name="two", num_replicas=2, num_stages=1, max_seq_len=128)
        assert len(info["replicas"]) == 2
        procs = {n.node_id: n for n in (n0, n1)}
        got: list[int] = []
        replays = 0
        killed = None
        for ev in generate_events(coord, model="two", prompt=prompt, params=params, timeout_s=60):
            got.extend(ev.token_ids)
            if len(got) >= 8 and killed is None:
                # a new session goes to the least-loaded replica, ties by predicted latency, then index
                reps = coord.models()[0]["replicas"]
                serving = min(reps, key=lambda r: (r["predicted_latency_s"], r["replica"]))
                killed = procs[serving["stages"][0]["node_id"]]
                killed.proc.kill()
            if ev.finish_reason:
                replays = ev.num_replays
        assert got == want[: len(got)] and len(got) == len(want)
        assert replays == 1
        left = coord.models()[0]["replicas"]
        assert len(left) == 1 and killed.node_id not in [s["node_id"] for r in left for s in r["stages"]]
