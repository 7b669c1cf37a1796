"""Inference spot checks end to end (docs/security.md, "Verification"): 2 replicas x 2 stages on
4 node processes, one of them altering half the steps it serves (``SWARM_FAULT=wrong-tokens=0.5``),
every step checked (``--verify-prob 1``). The client gets exactly the clean chain's greedy
tokens, the faulty node ends ``quarantined`` with the reason, and no honest node is."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import launch_node, wait_until
from tests.multiproc.inference.test_pipeline_generation import collect, coordinator, reference

pytestmark = pytest.mark.multiproc

PROMPTS = ["The swarm pools volunteer", "Once upon a time there was", "Gradients flow back"]


@pytest.mark.timeout(120)
def test_wrong_tokens_node_is_quarantined_and_clients_get_the_clean_tokens(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    params = SamplingParams(max_new_tokens=16)  # greedy
    want = [reference(d, tok.encode(p).ids, params, None) for p in PROMPTS]
    handles = []
    with coordinator(tmp_path) as coord:
        try:
            envs = [None, None, None, {"SWARM_FAULT": "wrong-tokens=0.5"}]
            with ThreadPoolExecutor(4) as pool:  # start the nodes at once
                handles = list(pool.map(lambda i: launch_node(coord, tmp_path / f"n{i}", env=envs[i]), range(4)))
            faulty = handles[3].node_id
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 4, 30, message="4 online")
            info = coord.serve(d, name="tiny", num_replicas=2, num_stages=2, max_seq_len=128, verify_prob=1.0)
            assert info["verification"]["verify_prob"] == 1.0 and len(info["replicas"]) == 2
            assert faulty in {s["node_id"] for r in info["replicas"] for s in r["stages"]}
            with ThreadPoolExecutor(len(PROMPTS)) as pool:  # sessions on both chains at once
                got = list(pool.map(lambda p: collect(coord, "tiny", p, params), PROMPTS))
            assert got == want
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
            model = coord.models()[0]
        finally:
            for h in handles:
                h.proc.stop()
    assert nodes[faulty]["state"] == "quarantined", nodes[faulty]
    assert "inference spot check" in nodes[faulty]["quarantine_reason"], nodes[faulty]
    assert [n["state"] for i, n in nodes.items() if i != faulty] == ["online"] * 3
    assert model["verification"]["checks"] >= 1 and model["verification"]["failed"] >= 1, model
