"""Measuring the link from this node to a peer over the peer service.

RTT: median of ``num_pings`` small Ping round trips (after one warm-up that opens the
connection). Bandwidth: stream ``probe_bytes`` in chunks; the receiver reports how long the
bytes after the first chunk took to arrive, so connection set-up and the first window do not
count. Falls back to sender-side timing if the receiver saw a single chunk.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import grpc

from swarm.errors import PeerError
from swarm.proto.v1 import peer_pb2 as pb
from swarm.proto.v1 import peer_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.errors import translate_rpc_errors

PROBE_CHUNK_BYTES = 64 << 10


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSample:
    rtt_s: float
    bandwidth_Bps: float
    probe_bytes: int


def measure_link(address: str, *, security, probe_bytes: int = 4 << 20, num_pings: int = 5,
                 expected_node_id: str | None = None, timeout_s: float = 60.0,
                 authorize_wait_s: float = 0.0, task_id: str = "") -> LinkSample:
    """Measure RTT and bandwidth to the peer service at ``address`` (TLS with ``security``; with
    ``expected_node_id`` the peer's certificate must be that node's). The destination accepts the
    probe once it has heard of the task (its next heartbeat): a refusal is retried for
    ``authorize_wait_s``. ``task_id`` names the coordinator's task in the first chunk (the
    receiver reports it too: both ends must agree). Raises PeerError."""
    payload = os.urandom(PROBE_CHUNK_BYTES)
    with data_channel(address, security=security, node_id=expected_node_id) as channel:
        stub = pb_grpc.PeerStub(channel)
        with translate_rpc_errors(f"peer at {address}"):
            warm = stub.Ping(pb.PingRequest(payload=b"x"), timeout=10)
            if expected_node_id and warm.node_id != expected_node_id:
                raise PeerError(f"peer at {address} is {warm.node_id}, not {expected_node_id}")
            rtts = []
            for _ in range(max(1, num_pings)):
                t0 = time.perf_counter()
                stub.Ping(pb.PingRequest(payload=b"p" * 32), timeout=10)
                rtts.append(time.perf_counter() - t0)
            rtt = statistics.median(rtts)

            num_chunks = max(2, -(-probe_bytes // PROBE_CHUNK_BYTES))

            def chunks():
                for i in range(num_chunks):  # the first names the task: the receiver reports it too
                    yield pb.ProbeChunk(data=payload, task_id=task_id if i == 0 else "")

            wait_until = time.monotonic() + authorize_wait_s
            while True:
                try:
                    t0 = time.perf_counter()
                    reply = stub.BandwidthProbe(chunks(), timeout=timeout_s)
                    sender_s = time.perf_counter() - t0
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.PERMISSION_DENIED or time.monotonic() > wait_until:
                        raise
                    time.sleep(0.1)  # the destination's next heartbeat tells it about this task
    if reply.bytes_received != num_chunks * PROBE_CHUNK_BYTES:
        raise PeerError(f"peer at {address} received {reply.bytes_received} of {num_chunks * PROBE_CHUNK_BYTES} probe bytes")
    timed_bytes = reply.bytes_received - reply.first_chunk_bytes
    if reply.num_chunks >= 2 and reply.first_to_last_s > 0:
        bandwidth = timed_bytes / reply.first_to_last_s
    else:
        bandwidth = reply.bytes_received / max(sender_s - rtt, 1e-6)
    return LinkSample(rtt_s=max(rtt, 1e-7), bandwidth_Bps=bandwidth, probe_bytes=int(reply.bytes_received))
