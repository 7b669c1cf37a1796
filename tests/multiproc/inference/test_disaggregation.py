"""Disaggregated prefill and decode on real processes (`swarm serve --disaggregate`): 4 nodes,
2 stages, a prefill chain and a decode chain. Every session is prefilled on the prefill chain,
its KV cache moves stage by stage to the decode chain (node to node, TLS), and decoding there
gives the single-process greedy tokens. With spot checks on, a decode node altering half its
steps (``SWARM_FAULT=wrong-tokens=0.5``) loses its work and the client still gets the clean tokens."""

from __future__ import annotations

import json
import threading

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import (FAST_COORDINATOR_ARGS, coordinator_proc, generate_events, launch_node, nodes_proc,
                                 wait_until)
from tests.multiproc.inference.test_pipeline_generation import TOKEN, collect, coordinator, reference

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
        assert info["verification"]["verify_prob"] == 0.05  # spot checks on by default: replays on the prefill chain
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


@pytest.mark.timeout(120)
def test_checked_disaggregated_serving_drops_a_wrong_decode_node_and_gives_the_clean_tokens(tmp_path):
    """2 nodes, 1 stage: a prefill chain and a decode chain, every step checked (--verify-prob 1).
    The faulty node claims a tiny TFLOPS so that placement makes it the decode chain. Its decode
    steps are replayed on the prefill chain; its caches began with pushed KV, whose hand-off both
    ends committed to (swarm/inference/kv_receipt.py), so the referee's recomputation of that KV
    shows the pushed cache was right and the wrong output its own: it is quarantined (its replays
    of the prefill chain's steps are its own too, and a wrong one quarantines it as well). The
    honest node is never blamed, and every client gets the single-process greedy tokens."""
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=2, hidden_size=64, num_heads=4, seed=7)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["Checks ride on the prefill chain", "a decode node that lies", "loses its work"]
    greedy = SamplingParams(max_new_tokens=10)
    want = [reference(d, tok.encode(p).ids, greedy, None) for p in prompts]
    with coordinator(tmp_path) as coord:
        honest = launch_node(coord, tmp_path / "n0")
        faulty = launch_node(coord, tmp_path / "n1", env={"SWARM_FAULT": "wrong-tokens=0.5,claim-tflops=0.0001"})
        try:
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 2, 30, message="2 online")
            info = coord.serve(d, name="tiny", num_replicas=2, num_stages=1, max_seq_len=96, verify_prob=1.0,
                               disaggregate="on")
            dis = info["disaggregation"]
            assert dis["enabled"] and dis["prefill_nodes"] == [honest.node_id] and dis["decode_nodes"] == [faulty.node_id]
            got = [collect(coord, "tiny", p, greedy) for p in prompts]
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
            model = coord.models()[0]
        finally:
            honest.proc.stop()
            faulty.proc.stop()
    assert got == want
    assert nodes[honest.node_id]["state"] == "online", nodes[honest.node_id]
    assert nodes[faulty.node_id]["state"] == "quarantined", (model, nodes)
    assert model["verification"]["failed"] >= 1, model


@pytest.mark.timeout(150)
def test_a_prefill_node_pushing_wrong_kv_is_quarantined_and_the_decode_node_is_not(tmp_path):
    """3 nodes, 1 stage, 2 chains, every step checked. The faulty node is the compute-rich one
    (the others claim a tiny TFLOPS), so it prefills; it computes honestly but alters every KV cache
    it pushes (SWARM_FAULT corrupt-kv=1), committing to what it sent (it cannot forge the decode
    node's signed receipt). The honest decode node's outputs are then wrong from a right input;
    the referee recomputes the pushed KV, finds the committed cache wrong and quarantines its
    pusher, never the decode node; the chains are re-placed on the honest nodes and every client
    gets the single-process greedy tokens."""
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=2, hidden_size=64, num_heads=4, seed=13)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["the pusher alters the cache", "the decode node is honest", "and is not blamed"]
    greedy = SamplingParams(max_new_tokens=8)
    want = [reference(d, tok.encode(p).ids, greedy, None) for p in prompts]
    # a node silent for 3 s (FAST_COORDINATOR_ARGS) is lost; the retired chains' re-placement loads
    # stages while the referee recomputes, and on a loaded 2-core box a node once went silent that long
    args = [*FAST_COORDINATOR_ARGS, "--token", TOKEN, "--node-timeout-s", "15"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord:
        faulty = launch_node(coord, tmp_path / "n0", env={"SWARM_FAULT": "corrupt-kv=1"})
        honest = [launch_node(coord, tmp_path / f"n{i}", env={"SWARM_FAULT": "claim-tflops=0.0001"}) for i in (1, 2)]
        try:
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 online")
            info = coord.serve(d, name="tiny", num_replicas=2, num_stages=1, max_seq_len=96, verify_prob=1.0,
                               disaggregate="on")
            dis = info["disaggregation"]
            assert dis["enabled"] and dis["prefill_nodes"] == [faulty.node_id], dis
            got = [collect(coord, "tiny", p, greedy) for p in prompts]
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
            model = coord.models()[0]
        finally:
            for h in [faulty, *honest]:
                h.proc.stop()
    assert got == want
    assert nodes[faulty.node_id]["state"] == "quarantined", (model, nodes[faulty.node_id])
    for h in honest:
        assert nodes[h.node_id]["state"] == "online", nodes[h.node_id]
    assert model["verification"]["failed"] >= 1, model


@pytest.mark.timeout(120)
def test_auto_disaggregates_heterogeneous_nodes_and_gives_single_process_tokens(tmp_path):
    """`--disaggregate auto` engaged on real processes: two nodes of this one machine claim to be
    different hardware (SWARM_FAULT claim-device: else placement pools one device model's figures
    and predicts no gain), one compute-rich with little memory bandwidth (1e8 B/s), one with a
    tenth of the compute (under its measurement: never cut) and 1e10 B/s (20 bytes per FLOP/s,
    the most believed). At 4 sessions per chain the prediction favours disaggregating by 1.5-2.3x
    on this model for any rich-node measurement from 0.002 TFLOPS up and links from 30 MB/s and
    5 ms (at 8 sessions it fell to 1.07x on a loaded CI machine whose rich node measured 0.0155
    TFLOPS), the model says it is disaggregated, and the client gets the single-process greedy
    tokens through the KV hand-off."""
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=2, hidden_size=64, num_heads=4, seed=11)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["auto decides from the claimed hardware", "and the tokens stay the same"]
    greedy = SamplingParams(max_new_tokens=8)
    want = [reference(d, tok.encode(p).ids, greedy, None) for p in prompts]
    with coordinator(tmp_path) as coord:
        rich = launch_node(coord, tmp_path / "n0", env={"SWARM_FAULT": "claim-device=compute-rich,claim-mem-bandwidth=1e8"})
        lean = launch_node(coord, tmp_path / "n1", env={
            "SWARM_FAULT": "claim-device=bandwidth-rich,claim-tflops=0.0005,claim-mem-bandwidth=1e10"})
        try:
            wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 2, 30, message="2 online")
            info = coord.serve(d, name="tiny", num_replicas=2, num_stages=1, max_seq_len=96, sessions_per_replica=4,
                               disaggregate="auto")
            dis = info["disaggregation"]
            assert dis["enabled"], json.dumps(dis)
            assert dis["reason"].startswith("auto: disaggregated"), dis["reason"]
            assert dis["prefill_nodes"] == [rich.node_id] and dis["decode_nodes"] == [lean.node_id], dis
            got = [collect(coord, "tiny", p, greedy) for p in prompts]
            dis = coord.models()[0]["disaggregation"]
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
        finally:
            rich.proc.stop()
            lean.proc.stop()
    assert got == want
    assert dis["enabled"] and dis["num_handoffs"] == len(prompts) and dis["num_handoff_failures"] == 0, dis
    # the decode node's steps were seen (coordinator/inference/memwatch.py): a positive lower bound
    assert nodes[lean.node_id]["mem_bandwidth_seen_Bps"] > 0, nodes[lean.node_id]
