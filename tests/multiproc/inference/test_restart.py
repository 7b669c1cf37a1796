"""A restarted coordinator re-places the models it served, and generation works again."""

from __future__ import annotations

import socket

import pytest
from tokenizers import Tokenizer

from swarm.inference.sampling import SamplingParams
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import FAST_COORDINATOR_ARGS, coordinator_proc, node_proc, wait_until
from tests.multiproc.inference.test_pipeline_generation import TOKEN, collect, reference

pytestmark = pytest.mark.multiproc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(110)
def test_models_come_back_after_a_coordinator_restart(tmp_path):
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "gpt2", num_layers=2, hidden_size=64, num_heads=4, seed=6)
    prompt = "Each node holds a few layers"
    params = SamplingParams(max_new_tokens=16)
    want = reference(d, Tokenizer.from_file(str(d / "tokenizer.json")).encode(prompt).ids, params, cfg.eos_token_id)
    port = free_port()
    args = FAST_COORDINATOR_ARGS + ["--token", TOKEN]
    with coordinator_proc(tmp_path / "coord", port=port, extra_args=args) as coord:
        with node_proc(coord, tmp_path / "n0"), node_proc(coord, tmp_path / "n1"):
            wait_until(lambda: len([n for n in coord.snapshot().nodes if n.state == "online"]) == 2, timeout_s=30)
            coord.serve(d, name="kept", num_stages=2, max_seq_len=64)
            assert collect(coord, "kept", prompt, params) == want
            coord.proc.stop()
            with coordinator_proc(tmp_path / "coord", port=port, extra_args=args) as coord2:
                wait_until(lambda: [m["state"] for m in coord2.models()] == ["ready"], timeout_s=60,
                           message="model restored")
                assert collect(coord2, "kept", prompt, params) == want
