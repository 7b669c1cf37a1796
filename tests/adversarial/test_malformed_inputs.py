"""Malformed or oversized input gets a clean 4xx / INVALID_ARGUMENT, never INTERNAL or HTTP 500.

In-process coordinator with the jobs and inference plugins, real gRPC and HTTP on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request

import grpc
import pytest

from swarm.proto.v1 import training_pb2 as tpb
from swarm.proto.v1 import training_pb2_grpc as tpb_grpc
from swarm.transport.auth import api_token_metadata
from tests.helpers.foundation import inprocess_coordinator
from tests.helpers.tls import app_channel

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with inprocess_coordinator(tmp_path_factory.mktemp("coord"), plugins=("coordinator.jobs", "coordinator.inference"),
                               max_model_params=1_000_000) as app:
        yield app


def _post(app, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{app.http_port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {app.read_token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (ConnectionResetError, BrokenPipeError):  # the server may close before reading a refused body
        return 413, {}


def test_oversized_http_body_is_413(app):
    status, _ = _post(app, "/v1/chat/completions", b"x" * (20 << 20))
    assert status == 413


def test_deeply_nested_json_is_400(app):
    status, body = _post(app, "/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and "nests deeper" in body["error"]["message"]
    status, body = _post(app, "/v1/completions", b'{"model": "m", "prompt": ' + b"[" * 100 + b"1" + b"]" * 100 + b"}")
    assert status == 400


def test_invalid_json_still_gets_the_handlers_own_400(app):
    status, body = _post(app, "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON object" in body["error"]["message"]


def _submit(app, files: dict[str, bytes]):
    def chunks():
        yield tpb.SubmitJobChunk(spec=tpb.JobSpec(steps=1, batch_size=2, micro_batch_size=1, seq_len=8, lr=1e-3,
                                                                  peer_timeout_s=30))
        for name, data in files.items():
            yield tpb.SubmitJobChunk(file=tpb.FileHeader(name=name, size_bytes=len(data),
                                                         sha256=hashlib.sha256(data).hexdigest()), data=data)

    with app_channel(app) as ch:
        with pytest.raises(grpc.RpcError) as e:
            tpb_grpc.TrainingStub(ch).SubmitJob(chunks(), metadata=api_token_metadata(app.admin_token), timeout=30)
    return e.value.code(), e.value.details()


def test_non_utf8_config_json_is_invalid_argument(app):
    code, details = _submit(app, {"checkpoint/config.json": b'{"model_type": "\xff\xfe llama"}',
                                  "data/a.txt": b"hello world " * 20})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "config.json" in details


def test_config_only_model_over_the_cap_is_refused_naming_the_flag(app):
    big = dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
    code, details = _submit(app, {"checkpoint/config.json": json.dumps(big).encode(), "data/a.txt": b"hello " * 50})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-model-params" in details
    assert not any((app.state_dir / "jobs").glob("*/init"))  # no weights were made
