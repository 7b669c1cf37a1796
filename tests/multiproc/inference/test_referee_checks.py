"""Spot checks of a model served with one replica (docs/security.md, "Verification"): no other
chain can replay its windows, so the coordinator's referee does (coordinator/inference/checks.py).
One chain of 2 stages, one of them altering half the steps it serves (``SWARM_FAULT=wrong-tokens=0.5``),
every window checked (``--verify-prob 1``), and a spare node: the faulty node ends ``quarantined``,
the chain is re-placed on the spare, and the client gets exactly a single process's greedy tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import launch_node, wait_until
from tests.multiproc.inference.test_pipeline_generation import collect, coordinator, reference

pytestmark = pytest.mark.multiproc

PROMPT = "The swarm pools volunteer"


@pytest.mark.timeout(120)
def test_one_replica_model_is_checked_by_the_referee_and_the_faulty_node_quarantined(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    params = SamplingParams(max_new_tokens=16)  # greedy
    want = reference(d, tok.encode(PROMPT).ids, params, None)
    handles = []
    with coordinator(tmp_path) as coord:
        try:
            # the chain's two nodes first (the faulty one among them), the spare once it is placed
            handles.append(launch_node(coord, tmp_path / "n0"))
            handles.append(launch_node(coord, tmp_path / "n1", env={"SWARM_FAULT": "wrong-tokens=0.5"}))
            faulty = handles[1].node_id
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 2, 30, message="2 online")
            info = coord.serve(d, name="tiny", num_replicas=1, num_stages=2, max_seq_len=128, verify_prob=1.0)
            assert len(info["replicas"]) == 1
            assert faulty in {s["node_id"] for s in info["replicas"][0]["stages"]}
            handles.append(launch_node(coord, tmp_path / "n2"))
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="spare online")
            got = collect(coord, "tiny", PROMPT, params)
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
            model = coord.models()[0]
        finally:
            for h in handles:
                h.proc.stop()
    assert got == want
    assert nodes[faulty]["state"] == "quarantined", nodes[faulty]
    assert "inference spot check" in nodes[faulty]["quarantine_reason"], nodes[faulty]
    assert [n["state"] for i, n in nodes.items() if i != faulty] == ["online"] * 2
    v = model["verification"]
    assert v["referee_checks"] >= 1 and v["failed"] >= 1 and v["referee_void"] == 0, v
    assert faulty not in {s["node_id"] for r in model["replicas"] for s in r["stages"]}, model["replicas"]
