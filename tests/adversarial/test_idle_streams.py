"""Nothing freezes a service: idle streams and idle connections must not delay liveness RPCs.

Real processes. A stranger opens 20 idle TCP connections, 20 BandwidthProbe streams and 20
PushTensor streams that never send a chunk to a node's peer port (20 SubmitJob streams to the
coordinator); Ping (Heartbeat) must still answer within 1 s, streams over the per-peer limit are
refused at once with RESOURCE_EXHAUSTED, and admitted idle streams are cancelled after the idle
deadline (--stream-idle-timeout-s).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack

import grpc

from node.coordinator_link import CoordinatorLink
from swarm.clock import SystemClock
from swarm.identity import Identity
from swarm.proto.v1 import peer_pb2, peer_pb2_grpc, training_pb2_grpc
from swarm.transport.auth import api_token_metadata
from swarm.transport.channels import data_channel
from tests.helpers.foundation import HW
from tests.helpers.procs import FAST_COORDINATOR_ARGS, FAST_NODE_ARGS, coordinator_proc, node_proc, wait_until

IDLE_S = 2.0
NUM_IDLE = 20


def _idle_requests(release: threading.Event):
    release.wait(60)  # never sends a message until released
    return
    yield  # noqa: unreachable -- makes this a generator


def _open_idle_sockets(port: int, stack: ExitStack) -> None:
    for _ in range(NUM_IDLE):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        stack.callback(s.close)


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
        _open_idle_sockets(node.port, stack)
        attacker = stack.enter_context(data_channel(f"127.0.0.1:{node.port}"))
        probes = [peer_pb2_grpc.PeerStub(attacker).BandwidthProbe.future(_idle_requests(release), timeout=30)
                  for _ in range(NUM_IDLE)]
        pushes = [training_pb2_grpc.PipelinePeerStub(attacker).PushTensor.future(_idle_requests(release), timeout=30)
                  for _ in range(NUM_IDLE)]
        refused_at = time.monotonic()
        wait_until(lambda: sum(f.done() for f in probes + pushes) >= 2 * NUM_IDLE - 8, timeout_s=10,
                   message="streams over the per-peer limit refused")
        refused_s = time.monotonic() - refused_at

        with data_channel(f"127.0.0.1:{node.port}") as ch:
            stub = peer_pb2_grpc.PeerStub(ch)
            worst = _worst_latency_s(lambda: stub.Ping(peer_pb2.PingRequest(payload=b"x"), timeout=5))
        print(f"node Ping under {NUM_IDLE} idle sockets + {2 * NUM_IDLE} idle streams: worst {worst * 1000:.1f} ms; "
              f"excess streams refused within {refused_s:.2f} s")
        assert worst < 1.0

        codes = _settle(probes + pushes, timeout_s=IDLE_S + 10)  # admitted ones: cancelled after IDLE_S
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) == 2 * NUM_IDLE - 8, codes
        assert codes.get(grpc.StatusCode.CANCELLED, 0) + codes.get(grpc.StatusCode.UNAVAILABLE, 0) == 8, codes
        with data_channel(f"127.0.0.1:{node.port}") as ch:  # and the node is still fine
            assert peer_pb2_grpc.PeerStub(ch).Ping(peer_pb2.PingRequest(payload=b"y"), timeout=5).node_id == node.node_id


def test_idle_streams_do_not_delay_the_coordinators_heartbeats(tmp_path):
    release = threading.Event()
    with ExitStack() as stack:
        coord = stack.enter_context(coordinator_proc(tmp_path / "coord", extra_args=[
            *FAST_COORDINATOR_ARGS, "--stream-idle-timeout-s", str(IDLE_S)]))
        stack.callback(release.set)
        link = CoordinatorLink(coord.address, Identity.from_seed(b"beating"), SystemClock())
        stack.callback(link.close)
        reg = link.register(name="beating", peer_address="127.0.0.1:24680", hardware=HW, token=coord.token)
        _open_idle_sockets(coord.port, stack)
        attacker = stack.enter_context(grpc.insecure_channel(coord.address))
        submits = [training_pb2_grpc.TrainingStub(attacker).SubmitJob.future(
            _idle_requests(release), metadata=api_token_metadata(coord.admin_token), timeout=30) for _ in range(NUM_IDLE)]
        worst = _worst_latency_s(lambda: link.heartbeat(reg.session, status="idle", metrics_json="{}"))
        print(f"coordinator Heartbeat under {NUM_IDLE} idle sockets + {NUM_IDLE} idle SubmitJob streams: "
              f"worst {worst * 1000:.1f} ms")
        assert worst < 1.0
        codes = _settle(submits, timeout_s=IDLE_S + 10)
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) == NUM_IDLE - 16, codes  # 16 per peer by default
        assert sum(codes.values()) == NUM_IDLE and grpc.StatusCode.OK not in codes, codes
