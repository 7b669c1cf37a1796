"""Disaggregated prefill and decode on real processes (`swarm serve --disaggregate`): 4 nodes,
2 stages, a prefill chain and a decode chain. Every session is prefilled on the prefill chain,
its KV cache moves stage by stage to the decode chain (node to node, TLS), and decoding there
gives the single-process greedy tokens."""

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
def test_disaggregated_serving_moves_the_kv_and_gives_single_process_tokens(tmp_path):
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=5)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["Prefill runs on the compute rich nodes", "and decoding continues elsewhere", "a third one"]
    greedy = SamplingParams(max_new_tokens=12)
    want = {p: reference(d, tok.encode(p).ids, greedy, None) for p in prompts}
    with coordinator(tmp_path) as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)]):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 4, timeout_s=30)
        info = coord.serve(d, name="tiny", num_replicas=2, num_stages=2, max_seq_len=128, sessions_per_replica=4,
                           disaggregate="on")
        dis = info["disaggregation"]
        assert dis["enabled"] and len(dis["prefill_nodes"]) == 2 and len(dis["decode_nodes"]) == 2
        assert set(dis["prefill_nodes"]).isdisjoint(dis["decode_nodes"])
        assert dis["predicted_gain"] > 0 and dis["reason"]
        assert info["verification"]["verify_prob"] == 0  # --disaggregate serves without spot checks
        chains = {tuple(s["node_id"] for s in r["stages"]) for r in info["replicas"]}
        assert chains == {tuple(dis["prefill_nodes"]), tuple(dis["decode_nodes"])}

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

        dis = coord.models()[0]["disaggregation"]
        assert dis["num_handoffs"] == len(prompts) and dis["num_handoff_failures"] == 0
        # each session's cache of its prompt moved: per position, every layer's K and V in float32
        positions = sum(len(tok.encode(p).ids) for p in prompts)
        assert dis["kv_bytes_moved"] == positions * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
