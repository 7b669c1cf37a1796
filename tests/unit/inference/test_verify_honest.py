"""The honest difference the inference spot-check tolerance must leave room for, measured on a
tiny model: a session decoded token by token on a 2-stage chain vs the same context replayed
as one prefill (what the checking chain does) vs the coordinator's one-piece recomputation."""

from __future__ import annotations

import pytest
import torch

from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.inference.verify import TOLERANCE, distance, sketch
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(60)


def test_decode_replay_and_recomputation_commit_within_a_hundredth_of_the_tolerance(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    chain = [StageRuntime(load_stage(tmp_path, lo, hi, is_first=lo == 0, is_last=hi == 4), max_seq_len=64,
                          max_sessions=4) for lo, hi in ((0, 2), (2, 4))]
    whole = load_stage(tmp_path, 0, 4, is_first=True, is_last=True).eval()
    ids, worst = [5, 17, 3, 99, 42], 0.0
    g = SamplingParams()
    for step in range(12):
        # the serving chain: prefill once, then one token per step (its KV caches)
        e = StepEntry(session_id="s", start_position=0 if step == 0 else len(ids) - 1,
                      num_tokens=len(ids) if step == 0 else 1, token_ids=tuple(ids if step == 0 else ids[-1:]),
                      sampling=g)
        h = chain[0].run([e])
        logits = chain[1].run([StepEntry(session_id="s", start_position=e.start_position, num_tokens=e.num_tokens,
                                         sampling=g)], h)
        # the checking chain: the whole context as a fresh session
        r = StepEntry(session_id=f"r{step}", start_position=0, num_tokens=len(ids), token_ids=tuple(ids), reset=True)
        rh = chain[0].run([r])
        rl = chain[1].run([StepEntry(session_id=f"r{step}", start_position=0, num_tokens=len(ids))], rh)
        chain[0].close([f"r{step}"]), chain[1].close([f"r{step}"])
        with torch.inference_mode():
            ref = whole(torch.tensor([ids]))[0, -1]
        worst = max(worst, distance(sketch(h[-1]), sketch(rh[-1])), distance(sketch(logits[0]), sketch(rl[0])),
                    distance(sketch(logits[0]), sketch(ref)))
        ids.append(int(torch.argmax(logits[0])))
    print(f"worst honest relative L2 distance of commitments: {worst:.2e} (tolerance {TOLERANCE})")
    assert worst < TOLERANCE / 100
