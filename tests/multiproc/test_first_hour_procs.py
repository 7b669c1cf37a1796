"""A newcomer's first hour with real processes: the served context is the model's (capped by
--max-seq-len) and too-long requests are refused before any work; a node pointed at the HTTP
port exits with a message instead of retrying forever, and never says READY."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from swarm.errors import InvalidRequestError
from swarm.inference.params import SamplingParams
from swarm.localswarm import start_node
from swarm.model.testing import make_tiny_checkpoint
from tests.helpers.procs import FAST_NODE_ARGS, coordinator_proc, node_proc, wait_until

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parents[2]


def _post(url: str, body: dict, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(90)
def test_served_context_is_the_models_and_long_requests_are_refused_up_front(tmp_path):
    d = tmp_path / "demo"
    make_tiny_checkpoint(d, "gpt2", num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=128)
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0"):
        wait_until(lambda: any(n.state == "online" for n in coord.snapshot().nodes), timeout_s=30)
        info = coord.serve(d, name="demo")  # no --max-seq-len: the model's 128
        assert info["max_seq_len"] == 128
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "models", "--coordinator", coord.address,
                              "--token", coord.read_token],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60).stdout
        assert "context 128" in out, out
        # 200 new tokens cannot fit: refused before any token is produced, naming the limit
        t0 = time.monotonic()
        with coord.client() as client:
            with pytest.raises(InvalidRequestError, match=r"128-token context") as info_err:
                list(client.generate(model="demo", prompt="hello", params=SamplingParams(max_new_tokens=200)))
            assert getattr(info_err.value, "grpc_code", None).name == "INVALID_ARGUMENT"
            # what fits still works
            events = list(client.generate(model="demo", prompt="hello", params=SamplingParams(max_new_tokens=4)))
            assert sum(len(e.token_ids) for e in events) == 4
        status, body = _post(coord.http_url + "/v1/completions", {"model": "demo", "prompt": "hello", "max_tokens": 200}, coord.read_token)
        assert status == 400 and "128-token context" in body["error"]["message"], body
        status, body = _post(coord.http_url + "/v1/completions",
                             {"model": "demo", "prompt": "hello", "max_tokens": 200, "stream": True}, coord.read_token)
        assert status == 400 and "128-token context" in body["error"]["message"], body
        assert time.monotonic() - t0 < 60
        # --max-seq-len caps it further; asking past the model's positions gives the model's
        assert coord.serve(d, name="short", max_seq_len=64)["max_seq_len"] == 64
        assert coord.serve(d, name="long", max_seq_len=4096)["max_seq_len"] == 128


@pytest.mark.timeout(60)
def test_node_given_the_http_port_exits_with_advice_and_never_says_ready(tmp_path):
    with coordinator_proc(tmp_path / "coord") as coord:
        http_address = f"127.0.0.1:{coord.http_port}"
        proc, _ = start_node(http_address, coord.token, tmp_path / "n0", extra_args=FAST_NODE_ARGS, wait_for="STARTED")
        try:
            proc.proc.wait(timeout=30)
            assert proc.proc.returncode == 1
            log = proc.log_tail(20000)
            assert f"{http_address} answers HTTP, not gRPC: is that the coordinator's --http-port?" in log
            assert not any(line.startswith("READY") for line in proc.lines)  # stdout
            assert coord.snapshot().nodes == ()
        finally:
            proc.stop()
