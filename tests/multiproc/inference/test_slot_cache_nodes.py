"""The GPU layout of a stage's KV caches (a slot cache, swarm/inference/slots.py) through real node
processes, on this CPU (``SWARM_SLOT_CACHE=1``): disaggregated serving with every step checked, so
sessions are prefilled on one chain, their caches exported and imported into another chain's rows,
decoded there in buckets while others join and leave, and replayed for the checks as temporary
sessions riding in the prefill chain's batches. The client gets the single-process greedy tokens.
The CPU layout (batch caches per set of sessions) runs the same. The run found that a decode
chain's stages could be asked to hold more sessions than the coordinator counted (a KV moving in,
a check replay, sessions closed only by the next step): hand-offs were refused and the chain
failed on "stage holds its maximum" (coordinator/inference/replica.py ``_used``)."""

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
@pytest.mark.parametrize("slots", ["1", "0"], ids=["slot-cache", "batch-groups"])
def test_slot_cache_nodes_hand_off_check_and_decode_the_single_process_tokens(tmp_path, slots):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=6)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompts = ["Rows of one cache", "sessions come and go while others decode", "a third", "and a fourth prompt here"]
    lengths = [10, 24, 6, 17]  # they finish at different steps: rows leave the bucket while others decode
    want = {p: reference(d, tok.encode(p).ids, SamplingParams(max_new_tokens=n), None) for p, n in zip(prompts, lengths)}
    with coordinator(tmp_path) as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)], env={"SWARM_SLOT_CACHE": slots}):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 4, timeout_s=30)
        info = coord.serve(d, name="tiny", num_replicas=2, num_stages=2, max_seq_len=96, sessions_per_replica=4,
                           disaggregate="on", verify_prob=1.0)
        assert info["disaggregation"]["enabled"]
        got: dict[str, list[int]] = {}

        def run(p: str, n: int) -> None:
            got[p] = [t for ev in generate_events(coord, model="tiny", prompt=p, params=SamplingParams(max_new_tokens=n),
                                                  timeout_s=60) for t in ev.token_ids]
        threads = [threading.Thread(target=run, args=(p, n)) for p, n in zip(prompts, lengths)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert got == want
        m = coord.models()[0]
        assert m["disaggregation"]["num_handoffs"] >= 1 and m["disaggregation"]["num_handoff_failures"] == 0
        v = m["verification"]
        assert v["checks"] > 0 and v["failed"] == 0, v
        assert all(n.state != "quarantined" for n in coord.snapshot().nodes)
