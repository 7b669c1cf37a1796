"""The node's own Peer servicer (protos/swarm/proto/v1/peer.proto): Ping and BandwidthProbe.

Protocol: see peer.proto. The receiver of a probe bounds the stream (``MAX_PROBE_BYTES``,
``MAX_CHUNK_BYTES``) and times it from the first chunk to the last with its monotonic clock.

Who may call (the caller's node id comes from its TLS certificate, ``identify(context)``):
``Ping`` any swarm member (the port only completes handshakes with swarm certificates);
``BandwidthProbe`` only a node that holds a measurement task towards this one now
(``probe_sources()``, learnt from heartbeats); others get PERMISSION_DENIED before any byte is read.
"""

from __future__ import annotations

import collections
import threading
import time

from swarm.errors import InvalidRequestError, PermissionDeniedError
from swarm.proto.v1 import peer_pb2 as pb
from swarm.proto.v1 import peer_pb2_grpc as pb_grpc
from swarm.transport.errors import grpc_errors

MAX_PING_BYTES = 1 << 10
MAX_CHUNK_BYTES = 1 << 20
MAX_PROBE_BYTES = 1 << 30
MAX_PROBE_S = 120.0  # a probe stream held open longer is cancelled (it would pin a server thread)


class PeerServicer(pb_grpc.PeerServicer):
    def __init__(self, node_id: str, *, traffic=None, identify=None, probe_sources=None) -> None:
        self.node_id = node_id
        self.traffic = traffic  # node.traffic.Traffic or None
        self._identify = identify  # context -> caller's node id (swarm.transport.tls); None: tests only
        self._probe_sources = probe_sources  # () -> frozenset of node ids with a task towards us
        # what this node saw as a probe's receiver, for the coordinator (the agent's next heartbeat)
        self._receipts: collections.deque = collections.deque(maxlen=16)
        self._receipts_lock = threading.Lock()

    def drain_receipts(self) -> list[tuple[str, int, int, float]]:
        """(task_id, bytes_received, timed_bytes, first_to_last_s) of probes received since the last call."""
        with self._receipts_lock:
            out = list(self._receipts)
            self._receipts.clear()
        return out

    @grpc_errors
    def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        if len(request.payload) > MAX_PING_BYTES:
            raise InvalidRequestError(f"ping payload must be at most {MAX_PING_BYTES} bytes")
        return pb.PingReply(node_id=self.node_id, payload=request.payload)

    @grpc_errors
    def BandwidthProbe(self, request_iterator, context) -> pb.ProbeReply:
        if self._identify is not None:
            caller = self._identify(context)
            if caller not in (self._probe_sources() if self._probe_sources else ()):
                raise PermissionDeniedError(f"node {caller[:12]} holds no measurement task towards node "
                                            f"{self.node_id[:12]}; probes run only when the coordinator asks")
        total = first = chunks = 0
        t_first = t_last = 0.0
        task_id = ""
        watchdog = threading.Timer(MAX_PROBE_S, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        context.add_callback(watchdog.cancel)
        for chunk in request_iterator:
            now = time.monotonic()
            n = len(chunk.data)
            if n > MAX_CHUNK_BYTES:
                raise InvalidRequestError(f"probe chunks must be at most {MAX_CHUNK_BYTES} bytes")
            if chunks == 0:
                t_first, first = now, n
                task_id = chunk.task_id[:64]
            t_last = now
            total += n
            chunks += 1
            if self.traffic is not None:
                self.traffic.add_received(n)
            if total > MAX_PROBE_BYTES:
                raise InvalidRequestError(f"a probe may carry at most {MAX_PROBE_BYTES} bytes")
        if task_id and chunks >= 2:
            with self._receipts_lock:
                self._receipts.append((task_id, total, total - first, t_last - t_first))
        return pb.ProbeReply(
            node_id=self.node_id, bytes_received=total, first_chunk_bytes=first,
            first_to_last_s=t_last - t_first, num_chunks=chunks,
        )
