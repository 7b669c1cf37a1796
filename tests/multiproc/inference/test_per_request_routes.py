"""Per-request routes on real processes: 2 stages x 2 replicas on 4 nodes (`swarm serve --routes`).

Sessions give the single-process greedy tokens; killing the first stage's node of a session's
route mid-stream re-routes only that stage (the session keeps its second stage, with its cache,
and continues on the other replica's first stage) with the same tokens. One of the session's
two routes, before or after the kill, mixes the replicas.
"""

from __future__ import annotations

import threading

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import generate_events, nodes_proc, wait_until
from tests.multiproc.inference.test_pipeline_generation import coordinator, reference

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(120)
def test_routes_give_single_process_tokens_and_a_lost_stage_is_rerouted(tmp_path):
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["Routes pick the fastest stages", "Any replica may feed the next"]
    greedy = SamplingParams(max_new_tokens=16)
    want = {p: reference(d, tok.encode(p).ids, greedy, None) for p in prompts}
    with coordinator(tmp_path) as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)]) as nodes:
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 4, timeout_s=30)
        info = coord.serve(d, name="tiny", num_replicas=2, num_stages=2, max_seq_len=128, sessions_per_replica=4,
                           routes=True)
        assert info["routes_enabled"] and len(info["replicas"]) == 2
        assert info["verification"]["verify_prob"] == 0  # --routes serves without spot checks

        # concurrent sessions: each gets a route; tokens equal one process
        got: dict[str, list[int]] = {}

        def run(p: str) -> None:
            got[p] = [t for ev in generate_events(coord, model="tiny", prompt=p, params=greedy, timeout_s=60)
                      for t in ev.token_ids]
        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == want

        # one long session: kill its route's first-stage node after a few tokens
        procs = {n.node_id: n for n in nodes}
        prompt = "A session whose node fails"
        long = SamplingParams(max_new_tokens=40)
        want_long = reference(d, tok.encode(prompt).ids, long, None)
        toks: list[int] = []
        killed, before, after, replays = None, None, None, 0
        for ev in generate_events(coord, model="tiny", prompt=prompt, params=long, timeout_s=60):
            toks.extend(ev.token_ids)
            if killed is None and len(toks) >= 8:
                before = [r for r in coord.models()[0]["routes"] if r["sessions"]]
                assert len(before) == 1, before
                killed = procs[before[0]["node_ids"][0]]
                killed.proc.kill()
            elif killed is not None and after is None and len(toks) >= 20:
                after = [r for r in coord.models()[0]["routes"] if r["sessions"]]
            if ev.finish_reason:
                replays = ev.num_replays
        assert toks == want_long
        assert replays == 1
        # the lost first stage moved to the other replica; the second stage (with its cache) stayed
        assert after is not None and len(after) == 1, after
        old, new = before[0], after[0]
        assert new["node_ids"][1] == old["node_ids"][1] and new["node_ids"][0] != old["node_ids"][0]
        assert new["replicas"][1] == old["replicas"][1] and new["replicas"][0] != old["replicas"][0]
        # so the tokens before or after the kill came from a mixed route (replica x feeding replica y)
        assert old["replicas"][0] != old["replicas"][1] or new["replicas"][0] != new["replicas"][1]
