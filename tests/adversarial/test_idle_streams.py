"""Nothing freezes a service: idle streams and idle connections must not delay liveness RPCs.

Real processes over TLS. An attacker opens to a node's peer port 20 idle TCP connections (no
handshake), 20 idle TLS connections (handshake done with a valid swarm client certificate, then
silence), and, as a node holding a valid certificate, 20 PushTensor and 20 BandwidthProbe streams
that never send a chunk; to the coordinator 20 idle TCP, 20 idle TLS connections and 20 SubmitJob
streams with the token. Ping (Heartbeat) must still answer within 1 s, streams over the per-peer
limit are refused at once with RESOURCE_EXHAUSTED, and admitted idle streams are cancelled after
the idle deadline (--stream-idle-timeout-s).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc

from node.coordinator_link import CoordinatorLink
from swarm import certs
from swarm.clock import SystemClock
from swarm.identity import Identity
from swarm.proto.v1 import peer_pb2, peer_pb2_grpc, training_pb2_grpc
from swarm.transport.auth import api_token_metadata
from swarm.transport.channels import control_channel, data_channel
from swarm.transport.tls import TlsSecurity, fetch_ca
from tests.helpers.foundation import HW
from tests.helpers.procs import FAST_COORDINATOR_ARGS, FAST_NODE_ARGS, coordinator_proc, node_proc, wait_until
from tests.helpers.tls import material_from_state_dir, security_from_state_dir

IDLE_S = 2.0
NUM_IDLE = 20


def _idle_requests(release: threading.Event):
    release.wait(60)  # never sends a message until released
    return
    yield  # noqa: unreachable -- makes this a generator


def _open_idle_sockets(port: int, stack: ExitStack) -> None:
    """NUM_IDLE TCP connections that never start the TLS handshake."""
    for _ in range(NUM_IDLE):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        stack.callback(s.close)


def _open_idle_tls(port: int, server_name: str, ca_pem: bytes, stack: ExitStack, *,
                   client: tuple[Path, Path] | None = None) -> list[ssl.SSLSocket]:
    """NUM_IDLE TLS connections whose handshake completed (verifying the server against
    ``ca_pem`` and ``server_name``; presenting ``client`` = (certificate file, key file) if
    given), then silence: not even the HTTP/2 preface."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(*client)
    conns = []
    for _ in range(NUM_IDLE):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=server_name)
        stack.callback(s.close)
        assert s.version() == "TLSv1.3" and s.selected_alpn_protocol() == "h2"
        conns.append(s)
    return conns


def _still_open(conn: ssl.SSLSocket) -> bool:
    """Whether the server kept ``conn`` (it may have sent its HTTP/2 settings; it did not close)."""
    conn.setblocking(False)
    try:
        return conn.recv(1 << 16) != b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False


def _worst_latency_s(call, num: int = 10) -> float:
    worst = 0.0
    for _ in range(num):
        t0 = time.perf_counter()
        call()
        worst = max(worst, time.perf_counter() - t0)
    return worst


def _settle(futures, timeout_s: float) -> dict[grpc.StatusCode, int]:
    codes: dict[grpc.StatusCode, int] = {}
    for f in futures:
        try:
            f.result(timeout=timeout_s)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        codes[code] = codes.get(code, 0) + 1
    return codes


def test_idle_streams_do_not_delay_a_nodes_ping(tmp_path):
    release = threading.Event()
    with ExitStack() as stack:
        coord = stack.enter_context(coordinator_proc(tmp_path / "coord"))
        node = stack.enter_context(node_proc(coord, tmp_path / "n0", extra_args=[
            *FAST_NODE_ARGS, "--stream-idle-timeout-s", str(IDLE_S)]))
        stack.callback(release.set)
        address = f"127.0.0.1:{node.port}"
        ca_pem, key_pem, cert_pem = material_from_state_dir(coord.state_dir, "f" * 32)  # a valid swarm certificate
        attacker_sec = TlsSecurity(ca_pem=ca_pem, key_pem=key_pem, cert_pem=cert_pem)
        (tmp_path / "attacker.pem").write_bytes(cert_pem)
        (tmp_path / "attacker.key").write_bytes(key_pem)
        _open_idle_sockets(node.port, stack)
        idle_tls = _open_idle_tls(node.port, certs.node_dns(node.node_id), ca_pem, stack,
                                  client=(tmp_path / "attacker.pem", tmp_path / "attacker.key"))
        attacker = stack.enter_context(data_channel(address, security=attacker_sec, node_id=node.node_id))
        # PushTensor is authorized on its header, so these wait, admitted, for a first message
        pushes = [training_pb2_grpc.PipelinePeerStub(attacker).PushTensor.future(_idle_requests(release), timeout=30)
                  for _ in range(NUM_IDLE)]
        refused_at = time.monotonic()
        wait_until(lambda: sum(f.done() for f in pushes) >= NUM_IDLE - 8, timeout_s=10,
                   message="streams over the per-peer limit refused")
        # with the per-peer limit held by idle pushes, probes are refused by the limit, before
        # the servicer would look at who is asking (a probe without a task: PERMISSION_DENIED)
        probes = [peer_pb2_grpc.PeerStub(attacker).BandwidthProbe.future(_idle_requests(release), timeout=30)
                  for _ in range(NUM_IDLE)]
        wait_until(lambda: sum(f.done() for f in probes + pushes) >= 2 * NUM_IDLE - 8, timeout_s=10,
                   message="streams over the per-peer limit refused")
        refused_s = time.monotonic() - refused_at

        with data_channel(address, security=security_from_state_dir(coord.state_dir, "e" * 32),
                          node_id=node.node_id) as ch:
            stub = peer_pb2_grpc.PeerStub(ch)
            worst = _worst_latency_s(lambda: stub.Ping(peer_pb2.PingRequest(payload=b"x"), timeout=5))
        print(f"node Ping under {NUM_IDLE} idle sockets + {NUM_IDLE} idle TLS connections + {2 * NUM_IDLE} idle "
              f"streams: worst {worst * 1000:.1f} ms; excess streams refused within {refused_s:.2f} s")
        assert worst < 1.0
        assert all(_still_open(c) for c in idle_tls)  # they really were held open while Ping answered

        codes = _settle(probes + pushes, timeout_s=IDLE_S + 10)  # admitted ones: cancelled after IDLE_S
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) == 2 * NUM_IDLE - 8, codes
        assert codes.get(grpc.StatusCode.CANCELLED, 0) + codes.get(grpc.StatusCode.UNAVAILABLE, 0) == 8, codes
        assert _settle(probes, timeout_s=1) == {grpc.StatusCode.RESOURCE_EXHAUSTED: NUM_IDLE}
        with data_channel(address, security=attacker_sec, node_id=node.node_id) as ch:  # and the node is still fine
            reply = peer_pb2_grpc.PeerStub(ch).Ping(peer_pb2.PingRequest(payload=b"y"), timeout=5)
            assert reply.node_id == node.node_id


def test_idle_streams_do_not_delay_the_coordinators_heartbeats(tmp_path):
    release = threading.Event()
    with ExitStack() as stack:
        coord = stack.enter_context(coordinator_proc(tmp_path / "coord", extra_args=[
            *FAST_COORDINATOR_ARGS, "--stream-idle-timeout-s", str(IDLE_S)]))
        stack.callback(release.set)
        # the CA pinned from the token, as nodes and users do
        user_sec = TlsSecurity(ca_pem=fetch_ca(coord.address, certs.parse_token(coord.token).fingerprint))
        link = CoordinatorLink(coord.address, Identity.from_seed(b"beating"), SystemClock(), security=user_sec)
        stack.callback(link.close)
        reg = link.register(name="beating", peer_address="127.0.0.1:24680", hardware=HW, token=coord.token,
                            tls_public_key=certs.public_key_der(certs.new_key()))
        _open_idle_sockets(coord.port, stack)
        idle_tls = _open_idle_tls(coord.port, certs.COORDINATOR_DNS, user_sec.ca_pem, stack)
        attacker = stack.enter_context(control_channel(coord.address, security=user_sec))
        submits = [training_pb2_grpc.TrainingStub(attacker).SubmitJob.future(
            _idle_requests(release), metadata=api_token_metadata(coord.admin_token), timeout=30) for _ in range(NUM_IDLE)]
        worst = _worst_latency_s(lambda: link.heartbeat(reg.session, status="idle", metrics_json="{}"))
        print(f"coordinator Heartbeat under {NUM_IDLE} idle sockets + {NUM_IDLE} idle TLS connections + {NUM_IDLE} "
              "idle SubmitJob streams: "
              f"worst {worst * 1000:.1f} ms")
        assert worst < 1.0
        assert all(_still_open(c) for c in idle_tls)
        codes = _settle(submits, timeout_s=IDLE_S + 10)
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) == NUM_IDLE - 16, codes  # 16 per peer by default
        assert sum(codes.values()) == NUM_IDLE and grpc.StatusCode.OK not in codes, codes
