"""Messages a newcomer meets in the first hour say what really happened and what to do:
missing vs wrong token, a corrupt checkpoint given to `swarm serve`, the HTTP port given as
--coordinator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from coordinator.inference.store import ServeParams, served_params
from swarm import certs
from swarm.errors import AuthError, InvalidRequestError, UnavailableError, WrongProtocolError
from swarm.model.testing import make_tiny_checkpoint
from swarm.transport.coordinator_client import CoordinatorClient
from swarm.transport.errors import error_from_rpc
from tests.helpers.foundation import inprocess_coordinator

REPO = Path(__file__).resolve().parents[2]


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_grpc_talking_to_an_http1_server_is_named_as_such():
    details = ("failed to connect to all addresses; last error: INTERNAL: ipv4:127.0.0.1:7080: Failed parsing "
               "HTTP/2 (Expected SETTINGS frame as the first frame, got frame type 80) (Trying to connect an "
               "http1.x server (HTTP status 400))")
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "coordinator at 127.0.0.1:7080")
    assert isinstance(err, WrongProtocolError) and not err.retryable
    assert str(err) == ("127.0.0.1:7080 answers HTTP, not gRPC: is that the coordinator's --http-port? "
                        "use its gRPC port (READY port=...)")
    # a plain refused connection is still "unreachable"
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Connection refused"), "coordinator at h:1")
    assert isinstance(err, UnavailableError) and "unreachable" in str(err)


def test_served_context_is_the_models_capped_by_the_ask():
    assert served_params(ServeParams(), 128).max_seq_len == 128  # default: the model's
    assert served_params(ServeParams(max_seq_len=64), 128).max_seq_len == 64
    assert served_params(ServeParams(max_seq_len=256), 128).max_seq_len == 128  # past the model's positions
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        ServeParams(max_seq_len=-1)


@pytest.mark.timeout(60)
def test_missing_and_wrong_tokens_get_different_messages(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, "gpt2", num_layers=2, hidden_size=32, num_heads=2, seed=1)
    with inprocess_coordinator(tmp_path / "coord", plugins=("coordinator.inference",)) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        fingerprint = certs.parse_token(app.join_token).fingerprint
        # no token at all: nothing can even verify the coordinator
        with CoordinatorClient(address, token=None) as client:
            with pytest.raises(AuthError, match="no token was given: pass --token or set SWARM_TOKEN"):
                client.unserve_model("tiny")
        # the read-only form (CA fingerprint, no secret): connects, but a change has no token
        with CoordinatorClient(address, token=f"swarm1.{fingerprint}") as client:
            with pytest.raises(AuthError, match="no token was given: pass --token or set SWARM_TOKEN"):
                client.unserve_model("tiny")
        # the right CA, a wrong secret
        with CoordinatorClient(address, token=certs.format_token(fingerprint, "wrong-token")) as client:
            with pytest.raises(AuthError, match="the token given is wrong: use the token printed by "
                                                "swarm-coordinator serve") as info:
                client.upload_model(ckpt, name="tiny", timeout_s=20)
            assert "no token was given" not in str(info.value)
        # not a swarm1 token at all (a pre-TLS secret): wrong, not missing
        with CoordinatorClient(address, token="wrong-token") as client:
            with pytest.raises(AuthError, match="use the token the coordinator prints") as info:
                client.upload_model(ckpt, name="tiny", timeout_s=20)
            assert "no token was given" not in str(info.value)


@pytest.mark.timeout(60)
def test_serving_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt, "gpt2", num_layers=2, hidden_size=32, num_heads=2, seed=1)
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01" * 64)
    bad_config = tmp_path / "badcfg"
    make_tiny_checkpoint(bad_config, "gpt2", num_layers=2, hidden_size=32, num_heads=2, seed=1)
    (bad_config / "config.json").write_text("{garbage")
    with inprocess_coordinator(tmp_path / "coord", plugins=("coordinator.inference",)) as app:
        with CoordinatorClient(f"127.0.0.1:{app.grpc_port}", token=app.admin_token) as client:
            with pytest.raises(InvalidRequestError, match=r"^model.safetensors is not a valid safetensors file") as info:
                client.upload_model(ckpt, name="tiny", timeout_s=20)
            assert "unreachable" not in str(info.value) and str(tmp_path) not in str(info.value)
            with pytest.raises(InvalidRequestError, match=r"cannot read config.json: it is not a JSON file"):
                client.upload_model(bad_config, name="tiny", timeout_s=20)
            assert client.list_models() == []  # nothing broken was kept
            assert not any((tmp_path / "coord").rglob("*.safetensors"))


@pytest.mark.timeout(60)
def test_http_port_given_as_coordinator_says_so(tmp_path):
    with inprocess_coordinator(tmp_path / "coord") as app:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # with the token, as a user has it: the CA fetch's TLS handshake meets the HTTP server
        cmd = [sys.executable, "-m", "swarm.cli", "models", "--coordinator", f"127.0.0.1:{app.http_port}",
               "--token", app.join_token]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1
        assert (f"127.0.0.1:{app.http_port} answers HTTP, not gRPC: is that the coordinator's --http-port? "
                "use its gRPC port (READY port=...)") in res.stderr
        assert "Failed parsing HTTP/2" not in res.stderr and "WRONG_VERSION_NUMBER" not in res.stderr


@pytest.mark.timeout(60)
def test_https_status_page_given_as_coordinator_says_so_too(tmp_path):
    # --tls-cert/--tls-key: the HTTP port completes a TLS handshake (with a certificate the token
    # does not pin) but does not speak gRPC; that is the HTTP port, not someone in the middle.
    from tests.helpers.tls import TestPki

    web = TestPki(tmp_path / "web-ca")
    key_pem, chain = web.ca.issue_server([], now_s=time.time(), write=False)
    (tmp_path / "web.key").write_bytes(key_pem)
    (tmp_path / "web.pem").write_bytes(chain)
    with inprocess_coordinator(tmp_path / "coord", http_tls_cert=tmp_path / "web.pem",
                               http_tls_key=tmp_path / "web.key") as app:
        address = f"127.0.0.1:{app.http_port}"
        with CoordinatorClient(address, token=app.join_token) as client:
            with pytest.raises(WrongProtocolError, match=re.escape(f"{address} answers HTTP, not gRPC: is that the "
                                                                   "coordinator's --http-port?")):
                client.list_models()
        # the gRPC port with a token for another CA is still refused as a possible impostor
        secret = app.join_token.rsplit(".", 1)[1]
        with CoordinatorClient(f"127.0.0.1:{app.grpc_port}", token=certs.format_token("0" * 64, secret)) as client:
            with pytest.raises(AuthError, match="someone in the middle"):
                client.list_models()


@pytest.mark.timeout(60)
def test_referee_budget_flag_reaches_the_checks_and_bad_values_are_refused(tmp_path):
    """--referee-gflops sets the inference referee's CPU budget (0: no referee); a negative or
    non-finite value stops the coordinator at start with a message naming the flag."""
    from coordinator.app import CoordinatorConfig
    from swarm.errors import ConfigError

    with inprocess_coordinator(tmp_path / "c0", plugins=("coordinator.inference",), referee_flops_per_s=0.0) as app:
        assert app.services.inference.checks.replays._flops_per_s == 0.0
    with inprocess_coordinator(tmp_path / "c1", plugins=("coordinator.inference",), referee_flops_per_s=5e9) as app:
        assert app.services.inference.checks.replays._flops_per_s == 5e9
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--referee-gflops"):
            CoordinatorConfig(state_dir=tmp_path / "c2", referee_flops_per_s=bad)
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(tmp_path / "c3"),
                           "--port", "0", "--http-port", "0", "--referee-gflops", "-5"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--referee-gflops" in proc.stderr, proc.stderr
