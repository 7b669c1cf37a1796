"""Serve tiny checkpoints on a 3-node pipeline of real processes; tokens equal single-process."""

from __future__ import annotations

import threading

import pytest

from swarm.errors import InvalidRequestError, NotFoundError
from swarm.inference.local import generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_config, load_stage
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import (FAST_COORDINATOR_ARGS, coordinator_proc, generate_events, nodes_proc,
                                 wait_until)

pytestmark = pytest.mark.multiproc

# A fixed join token: a random one may start with '-', which the node CLI's argparse takes for a flag.
TOKEN = "inference-test-token-0123456789"


def coordinator(tmp_path):
    return coordinator_proc(tmp_path / "coord", extra_args=FAST_COORDINATOR_ARGS + ["--token", TOKEN])


PROMPTS = ["The swarm pools volunteer", "Once upon a time there was"]


def reference(path, prompt_ids: list[int], params: SamplingParams, eos: int | None) -> list[int]:
    n = load_config(path).num_layers
    stage = load_stage(path, 0, n, is_first=True, is_last=True)
    rt = StageRuntime(stage, max_seq_len=128, max_sessions=2)
    return generate_local(rt.run_and_sample, prompt_ids, params, eos_token_id=eos)


def collect(coord, model: str, prompt: str, params: SamplingParams) -> list[int]:
    ids: list[int] = []
    for ev in generate_events(coord, model=model, prompt=prompt, params=params, timeout_s=60):
        ids.extend(ev.token_ids)
    return ids


@pytest.mark.timeout(110)
def test_three_node_pipeline_equals_single_process(tmp_path):
    from tokenizers import Tokenizer

    ckpts = {}
    for family in ("gpt2", "llama"):
        d = tmp_path / f"ckpt-{family}"
        cfg = make_tiny_checkpoint(d, family, num_layers=4, hidden_size=64, num_heads=4, seed=1)
        ckpts[family] = (d, cfg)
    with coordinator(tmp_path) as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]):
        wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 3, timeout_s=30)
        for family, (d, cfg) in ckpts.items():
            info = coord.serve(d, name=f"tiny-{family}", num_replicas=1, num_stages=3, max_seq_len=128,
                               sessions_per_replica=4)
            stages = info["replicas"][0]["stages"]
            assert len(stages) == 3 and len({s["node_id"] for s in stages}) == 3
            assert stages[0]["first_layer"] == 0 and stages[-1]["last_layer_excl"] == 4
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            params = SamplingParams(max_new_tokens=24)
            for prompt in PROMPTS:
                want = reference(d, tok.encode(prompt).ids, params, cfg.eos_token_id)
                assert collect(coord, f"tiny-{family}", prompt, params) == want, (family, prompt)
            # two concurrent sessions (batched on every stage), greedy and sampled
            sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, seed=11)
            want = {p: reference(d, tok.encode(p).ids, sampled, cfg.eos_token_id) for p in PROMPTS}
            got: dict[str, list[int]] = {}
            threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, collect(coord, f"tiny-{family}", p, sampled)))
                       for p in PROMPTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert got == want, family
        names = {m["name"]: m for m in coord.models()}
        assert set(names) == {"tiny-gpt2", "tiny-llama"} and all(m["state"] == "ready" for m in names.values())
        # bad requests are refused with INVALID_ARGUMENT / NOT_FOUND, and the service stays up
        with pytest.raises(NotFoundError):
            collect(coord, "nope", "hi", SamplingParams())
        with pytest.raises(InvalidRequestError):
            collect(coord, "tiny-gpt2", "hi " * 200, SamplingParams(max_new_tokens=8))
        with pytest.raises(InvalidRequestError):
            collect(coord, "tiny-gpt2", "hi", SamplingParams(max_new_tokens=500))
        assert len(collect(coord, "tiny-gpt2", "hi", SamplingParams(max_new_tokens=3))) >= 1
