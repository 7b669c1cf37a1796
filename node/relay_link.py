"""The node's part in relaying (swarm/transport/relay.py, coordinator/reachability.py).

- Every node, once registered, asks the coordinator to dial it back (CheckReachability) and
  logs what it found (swarm/reachability.py ``startup_message``). When it is relayed, it keeps
  a Listen stream open to its relay (the coordinator's gRPC port with its session, or a volunteer
  relay's peer port over mTLS) and splices each incoming connection with its own peer server.
  A new registration (the coordinator restarted) asks again and replaces the listener.
- A relayed node punches holes to the other nodes of its relay (swarm/transport/punch.py): its
  channels to them go through a local bridge that punches per connection and falls back to the
  relay; it accepts punches its relay announces. ``--no-hole-punching`` keeps everything relayed.
- A node started with ``--relay`` also OFFERS relaying: it serves a relay port and the Relay
  service on its peer port (callers identified by their certificate; each listens only for its
  own id). The coordinator assigns relayed nodes to it when it is itself reachable directly.
"""

from __future__ import annotations

import logging
import threading

from swarm.errors import CapacityError, SwarmError
from swarm.proto.v1 import relay_pb2, relay_pb2_grpc
from swarm.reachability import COORDINATOR_RELAY, startup_message
from swarm.transport.channels import data_channel, parse_address
from swarm.transport.relay import RelayHub, RelayLimits, RelayServer
from swarm.transport.errors import translate_rpc_errors
from swarm.transport.punch import PunchBridge, PunchStats, accept_punch
from swarm.transport.relay_service import RelayListener, RelayServicer

log = logging.getLogger(__name__)

LISTEN_READY_S = 5.0  # wait this long for the relay to confirm the Listen stream before READY
NO_RELAY_RETRY_S = 30.0


class NodeRelay:
    def __init__(self, *, node_id: str, security, coordinator_channel, call_metadata, offer_port: int | None,
                 bind_host: str, relay_limits: RelayLimits | None = None, hole_punching: bool = True) -> None:
        self.node_id, self.security = node_id, security
        self._coordinator_channel, self._call_metadata = coordinator_channel, call_metadata
        self.hub = RelayHub(relay_limits) if offer_port is not None else None
        self.server = RelayServer(self.hub, bind_host, offer_port) if self.hub is not None else None
        self.relay_port = 0
        self.reachability = "pending"
        self._retry_at_s = 0.0
        self._listener: RelayListener | None = None
        self._bridge: PunchBridge | None = None
        self._channel = None
        self.hole_punching = hole_punching
        self.punch_stats = PunchStats()
        self._lock = threading.Lock()

    # -- offering relaying (--relay) ------------------------------------------------------------
    def install(self, peer_server) -> None:
        if self.hub is not None:
            RelayServicer(self.hub, self.security.peer_identity).install(peer_server)

    def start_offer(self) -> int:
        if self.server is not None:
            self.relay_port = self.server.start()
            log.info("offering relaying on port %d (--relay)", self.relay_port)
        return self.relay_port

    def metrics(self) -> dict:
        """``relayed_bytes``: bytes this node relayed for others (both ways), when it offers relaying."""
        out = self.punch_stats.metrics() if self.reachability == "relayed" else {}
        if self.hub is not None:
            out["relayed_bytes"] = sum(v["to_node"] + v["from_node"] for v in self.hub.usage().values())
        return out

    # -- being reachable --------------------------------------------------------------------------
    def check(self, link, session: str, *, coordinator_address: str, local_address: tuple[str, int],
              now_s: float = 0.0) -> str:
        """Ask for the dial-back, log what it found, listen on the relay when relayed. Returns the
        reachability; "pending" when no relay is available (the log says what to do: asked again
        after NO_RELAY_RETRY_S, a volunteer relay may have come) or the call failed (asked again
        at the next heartbeat): see :meth:`due`."""
        try:
            reply = link.check_reachability(session, coordinator_host=parse_address(coordinator_address)[0])
        except CapacityError as exc:
            log.error("%s", exc)
            self.reachability, self._retry_at_s = "pending", now_s + NO_RELAY_RETRY_S
            return self.reachability
        except SwarmError as exc:  # the session is fine (registration just succeeded): retry soon
            log.warning("the coordinator's dial-back did not complete (%s); asking again", exc)
            self.reachability, self._retry_at_s = "pending", now_s
            return self.reachability
        msg = startup_message(reachability=reply.reachability, advertised=reply.advertised_address,
                              observed=reply.observed_address, relay_id=reply.relay_node_id,
                              relay_address=reply.relay_address, dial_error=reply.dial_error)
        (log.info if reply.reachability == "direct" else log.warning)("%s", msg)
        self._stop_listener()
        self.reachability = reply.reachability
        if reply.reachability == "relayed":
            self._listen(reply, local_address)
        return self.reachability

    def due(self, now_s: float) -> bool:
        """True when the dial-back must be asked for again (still pending)."""
        return self.reachability == "pending" and now_s >= self._retry_at_s

    def _listen(self, reply, local_address: tuple[str, int]) -> None:
        request = relay_pb2.RelayListenRequest()
        if reply.relay_node_id == COORDINATOR_RELAY:
            stub = relay_pb2_grpc.RelayStub(self._coordinator_channel)
            metadata = self._call_metadata
            what = "the coordinator's relay"
        else:
            self._channel = data_channel(reply.relay_peer_address, security=self.security, node_id=reply.relay_node_id)
            stub = relay_pb2_grpc.RelayStub(self._channel)
            metadata = tuple  # the mTLS certificate says who we are
            what = f"relay node {reply.relay_node_id[:12]}"
        relay = parse_address(reply.relay_address)

        def open_stream():
            return stub.Listen(request, metadata=metadata())

        def request_punch(peer: str) -> bytes:
            with translate_rpc_errors(what):
                return stub.Punch(relay_pb2.PunchRequest(peer_node_id=peer), metadata=metadata(), timeout=5).punch_id

        def on_punch(punch_id: bytes, peer: str) -> None:
            if self.hole_punching:
                accept_punch(relay, punch_id, peer, local_address, self.punch_stats)

        listener = RelayListener(open_stream=open_stream, relay_address=relay, local_address=local_address,
                                 what=what, on_punch=on_punch)
        bridge = None
        if self.hole_punching:
            # our channels to nodes on the same relay go through the bridge: punched, else relayed
            bridge = PunchBridge(relay=relay, request_punch=request_punch, stats=self.punch_stats)
            bridge.start()
            published = reply.published_address
            self.security.route = lambda address, node_id: bridge.address if address == published else address
        with self._lock:
            self._listener, self._bridge = listener, bridge
        listener.start()
        if not listener.listening.wait(LISTEN_READY_S):
            log.warning("%s has not confirmed the listen stream yet; peers reach this node once it does", what)

    def _stop_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            channel, self._channel = self._channel, None
            bridge, self._bridge = self._bridge, None
        if bridge is not None:
            self.security.route = None
            bridge.stop()
        if listener is not None:
            listener.stop()
        if channel is not None:
            channel.close()

    def stop(self) -> None:
        self._stop_listener()
        if self.server is not None:
            self.server.stop()

