"""A channel whose server was down for a while reaches it again within seconds of its return.

gRPC channels back off between connection attempts, by default exponentially up to 120 s; while
backing off, a call fails at once with the last error ("Connection refused") without trying.
Seen under load (CI's churn test): a node whose coordinator was down ~30 s kept failing for ~10 s
after the coordinator was back, overran the coordinator's re-registration grace period, was
declared lost, and its job rolled back to a checkpoint. swarm's channels cap the backoff
(swarm/transport/channels.py); this test has a server come up on a port that refused for 10 s and
asks that a call gets through within 4 s (with gRPC's defaults the next attempt is ~16 s in).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from swarm.transport.channels import control_channel
from tests.helpers.tls import TestPki

pytestmark = pytest.mark.timeout(60)

DOWN_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_call_gets_through_soon_after_the_server_returns(tmp_path):
    pki = TestPki(tmp_path)
    port = _free_port()
    ch = control_channel(f"127.0.0.1:{port}", security=pki.node("a" * 32))
    ping = ch.unary_unary("/t.T/Ping")
    t0 = time.monotonic()
    failures = 0
    while time.monotonic() - t0 < DOWN_S:  # a node retrying its heartbeat while the coordinator is down
        with pytest.raises(grpc.RpcError):
            ping(b"x", timeout=0.5)
        failures += 1
        time.sleep(0.5)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.T", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})])
    assert pki.coordinator().add_port(server, f"127.0.0.1:{port}", require_client_auth=False) == port
    server.start()
    up = time.monotonic()
    try:
        while True:
            try:
                assert ping(b"x", timeout=1.0) == b"x"
                break
            except grpc.RpcError:
                assert time.monotonic() - up < 4.0, "the channel still backs off after the server came back"
                time.sleep(0.2)
        assert failures >= 5
    finally:
        ch.close()
        server.stop(None)
