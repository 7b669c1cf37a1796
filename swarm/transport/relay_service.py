"""The Relay gRPC service (protos/swarm/proto/v1/relay.proto), both ends.

:class:`RelayServicer` serves ``Listen`` for a :class:`~swarm.transport.relay.RelayHub`; who
is calling comes from ``identify(context)``: the coordinator passes its session check (nodes
call it with session metadata), a volunteer relay node passes the mTLS peer identity. A caller
listens only for its own node id, so nobody can take another node's connections.

:class:`RelayListener` is the relayed node's side: it keeps a Listen stream open (re-opening it
with backoff when it breaks) and for each connection id runs
:func:`~swarm.transport.relay.dial_back` on a thread (each punch request: ``on_punch``).
``Punch`` starts a hole-punching rendezvous (swarm/transport/punch.py) with another node that
listens on the same relay.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable

import grpc

from swarm.errors import AuthError, InvalidRequestError, NotFoundError, SwarmError
from swarm.identity import is_node_id
from swarm.proto.v1 import relay_pb2 as pb
from swarm.proto.v1 import relay_pb2_grpc as pb_grpc
from swarm.transport.errors import grpc_errors, translate_rpc_errors
from swarm.transport.relay import CONNECTION_ID_BYTES, RelayHub, dial_back

log = logging.getLogger(__name__)

KEEPALIVE_S = 10.0  # well under any stream idle deadline (swarm/transport/limits.py)


class RelayServicer(pb_grpc.RelayServicer):
    def __init__(self, hub: RelayHub, identify: Callable[[object], str], *, keepalive_s: float = KEEPALIVE_S) -> None:
        self.hub, self.identify, self.keepalive_s = hub, identify, keepalive_s

    def install(self, server: grpc.Server) -> None:
        pb_grpc.add_RelayServicer_to_server(self, server)

    @grpc_errors
    def Listen(self, request: pb.RelayListenRequest, context):
        node_id = self.identify(context)
        if not node_id or node_id == "coordinator":
            raise AuthError("only a node may listen on a relay, for its own id")
        q = self.hub.listen(node_id)
        log.info("relay: node %s listens", node_id[:8])
        try:
            yield pb.RelayEvent()  # at once: the node knows it is reachable from now on
            while context.is_active():
                try:
                    event = q.get(timeout=self.keepalive_s)
                except queue.Empty:
                    yield pb.RelayEvent()
                    continue
                if event is None:  # a newer stream of the same node took over
                    return
                if event.kind == "punch":
                    yield pb.RelayEvent(punch_id=event.token, peer_node_id=event.peer)
                else:
                    yield pb.RelayEvent(connection_id=event.token)
        finally:
            self.hub.unlisten(node_id, q)
            log.info("relay: node %s stopped listening", node_id[:8])


    @grpc_errors
    def Punch(self, request: pb.PunchRequest, context) -> pb.PunchReply:
        node_id = self.identify(context)
        if not node_id or node_id == "coordinator":
            raise AuthError("only a node may ask for hole punching, for itself")
        if not is_node_id(request.peer_node_id):
            raise InvalidRequestError("peer_node_id is not a node id")
        pid = self.hub.punch_offer(node_id, request.peer_node_id)
        if pid is None:
            raise NotFoundError(f"node {request.peer_node_id[:12]} does not listen on this relay (or is busy); "
                                "use the relay path")
        return pb.PunchReply(punch_id=pid)


class RelayListener:
    """Keeps this node reachable through one relay until :meth:`stop`.

    ``open_stream()`` returns the Listen response iterator (the caller builds the channel and
    metadata: coordinator session or mTLS); ``relay_address`` is the relay port to dial back;
    ``local_address`` this node's own peer server."""

    def __init__(self, *, open_stream: Callable[[], object], relay_address: tuple[str, int],
                 local_address: tuple[str, int], what: str, seed: int = 0,
                 on_punch: Callable[[bytes, str], None] | None = None) -> None:
        self._open_stream, self.relay_address, self.local_address = open_stream, relay_address, local_address
        self._on_punch = on_punch
        self.what = what
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._call = None
        self.num_connections = 0
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay_s = 0.2
        while not self._stop.is_set():
            try:
                with translate_rpc_errors(self.what):
                    self._call = self._open_stream()
                    for event in self._call:
                        self.listening.set()
                        delay_s = 0.2
                        if len(event.connection_id) == CONNECTION_ID_BYTES:
                            threading.Thread(target=self._connect, args=(bytes(event.connection_id),),
                                             name="relay-dial-back", daemon=True).start()
                        elif len(event.punch_id) == CONNECTION_ID_BYTES and is_node_id(event.peer_node_id) \
                                and self._on_punch is not None:
                            threading.Thread(target=self._on_punch, args=(bytes(event.punch_id), event.peer_node_id),
                                             name="punch-accept", daemon=True).start()
            except SwarmError as exc:
                if not self._stop.is_set():
                    log.warning("relay listen stream to %s ended: %s; reopening in %.1f s", self.what, exc, delay_s)
            except Exception:  # noqa: BLE001 -- the listener must outlive one bad stream
                log.exception("relay listener error")
            self.listening.clear()
            self._stop.wait(delay_s * (0.75 + 0.5 * self._rng.random()))
            delay_s = min(delay_s * 2, 5.0)

    def _connect(self, cid: bytes) -> None:
        self.num_connections += 1
        try:
            dial_back(self.relay_address, cid, self.local_address)
        except OSError as exc:
            log.warning("relay dial-back to %s:%d failed: %s", *self.relay_address, exc)
