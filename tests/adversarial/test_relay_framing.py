"""A stage relaying a step's reply tries to frame the next stage (swarm/inference/commit_sig.py).

One chain of 2 stages checked by the coordinator's referee (``--verify-prob 1``). The node at
stage 0 (``SWARM_FAULT=tamper-relayed=1``) computes honestly but turns around the output
commitments of stage 1 in every reply it relays back; unsigned, the check would find stage 1's
output wrong from a right input and quarantine the honest node. Signed, those commitments are not
vouched for: nobody is blamed, the chain is retired and its nodes avoided, the session is
re-placed on the two spare nodes, and the client gets exactly a single process's greedy tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from swarm.identity import Identity
from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import FAST_COORDINATOR_ARGS, coordinator_proc, launch_node, wait_until
from tests.multiproc.inference.test_pipeline_generation import TOKEN, collect, reference

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(150)
def test_a_relaying_stage_cannot_frame_the_next_one(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=5)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    params = SamplingParams(max_new_tokens=12)
    prompt = "a relaying stage rewrites what the next one said"
    want = reference(d, tok.encode(prompt).ids, params, None)
    # a two-node chain runs in node id order: the tamperer gets the lower id, so it is stage 0
    dirs = sorted((tmp_path / n for n in ("a", "b")), key=lambda p: Identity.load_or_create(p).node_id)
    handles = []
    # chains are retired and re-placed while the referee recomputes: on a loaded 2-core box a node
    # can go silent for longer than FAST_COORDINATOR_ARGS' 3 s, which is not what this test is about
    args = [*FAST_COORDINATOR_ARGS, "--token", TOKEN, "--node-timeout-s", "15"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord:
        try:
            handles.append(launch_node(coord, dirs[0], env={"SWARM_FAULT": "tamper-relayed=1"}))
            handles.append(launch_node(coord, dirs[1]))
            tamperer, framed = handles[0].node_id, handles[1].node_id
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 2, 30, message="2 online")
            info = coord.serve(d, name="tiny", num_replicas=1, num_stages=2, max_seq_len=128, verify_prob=1.0)
            assert [s["node_id"] for s in info["replicas"][0]["stages"]] == [tamperer, framed], info["replicas"]
            handles += [launch_node(coord, tmp_path / f"spare{i}") for i in range(2)]
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 4, 30, message="4 online")
            got = collect(coord, "tiny", prompt, params)
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
            model = coord.models()[0]
        finally:
            for h in handles:
                h.proc.stop()
    assert got == want
    assert all(n["state"] == "online" for n in nodes.values()), {k[:8]: n["state"] for k, n in nodes.items()}
    assert model["verification"]["failed"] >= 1, model  # the forged commitments were seen, and judged on nobody
    serving = {s["node_id"] for r in model["replicas"] if r["state"] == "ready" for s in r["stages"]}
    assert tamperer not in serving and framed not in serving, model["replicas"]
