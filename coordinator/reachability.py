"""The coordinator's dial-back and its relay (issue 15; issue 11 item 4).

Protocol (CheckReachability in coordinator.proto, decisions in swarm/reachability.py):

1. A node registers; it is ``pending``: online, but given no work and sent to no peer.
2. Once it serves its new certificate it calls CheckReachability. The coordinator dials the
   advertised peer address with its own client certificate, as ``<node id>.node.swarm``: the
   TLS handshake succeeds only if the server there holds that node's certificate, and its
   Ping must answer with that id (proof of id over mTLS). Dial timeout :data:`DIAL_TIMEOUT_S`.
3. Reachable and not held by another online node: ``direct``, peers dial the advertised
   address. Otherwise ``relayed``: a relay is chosen (a volunteer's, else the coordinator's
   own relay port) and its relay-port address is published as the node's address; the node
   opens its Listen stream there (swarm/transport/relay_service.py). The reply says what the
   coordinator saw (the observed address is the node's NAT's public side).

The coordinator's relay port (``--relay-port``, 0 picks one, -1 turns relaying off) serves
relayed nodes whose Listen stream runs on the coordinator's gRPC port (session-authenticated).
Its published host is the coordinator's ``--host`` unless that is a wildcard; then the host
the node used to reach the coordinator (every node dials the coordinator at the same address).
"""

from __future__ import annotations

import logging
import time

from swarm.errors import CapacityError, SwarmError
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import peer_pb2
from swarm.proto.v1 import peer_pb2_grpc
from swarm.reachability import COORDINATOR_RELAY, RelayOffer, decide
from swarm.transport.channels import data_channel, parse_address
from swarm.transport.errors import translate_rpc_errors
from swarm.transport.relay import RelayHub, RelayLimits, RelayServer
from swarm.transport.relay_service import RelayServicer

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 3.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def dial_node(address: str, node_id: str, *, security, timeout_s: float = DIAL_TIMEOUT_S) -> tuple[bool, float, str]:
    """(proved, rtt_s, error): dial ``address`` over mTLS as node ``node_id`` and Ping it."""
    t0 = time.perf_counter()
    try:
        with data_channel(address, security=security, node_id=node_id) as channel:
            with translate_rpc_errors(f"node at {address}"):
                reply = peer_pb2_grpc.PeerStub(channel).Ping(peer_pb2.PingRequest(payload=b"reach"), timeout=timeout_s)
    except SwarmError as exc:
        return False, 0.0, str(exc)[:300]
    if reply.node_id != node_id:
        return False, 0.0, f"the server at {address} answered as {reply.node_id[:12]}, not {node_id[:12]}"
    return True, time.perf_counter() - t0, ""


def observed_address(peer: str) -> str:
    """grpc's ``context.peer()`` ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678") -> "1.2.3.4:5678"."""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") else ""


class Reachability:
    """The dial-back and relay assignment of one coordinator; ``start()`` opens the relay port."""

    def __init__(self, app, *, relay_port: int | None, relay_limits: RelayLimits | None = None) -> None:
        self.app = app
        self.hub = RelayHub(relay_limits)
        self.relay_server = RelayServer(self.hub, app.config.host, relay_port) if relay_port is not None else None
        self.relay_port = 0
        if self.relay_server is not None:  # planners price relayed links within this cap
            app.network.relay_caps[COORDINATOR_RELAY] = self.hub.limits.rate_Bps
        self._rtt_s: dict[str, float] = {}  # node id -> dial-back RTT (ranks volunteer relays)

    def install(self, server) -> None:
        RelayServicer(self.hub, self.app.authenticate_node).install(server)

    def start(self) -> int:
        if self.relay_server is not None:
            self.relay_port = self.relay_server.start()
            log.info("relay port %d: nodes nobody can dial are reached through it", self.relay_port)
        return self.relay_port

    def stop(self) -> None:
        if self.relay_server is not None:
            self.relay_server.stop()

    def _coordinator_offer(self, coordinator_host: str) -> RelayOffer | None:
        if self.relay_server is None:
            return None
        host = self.app.config.host
        if host in WILDCARD_HOSTS:
            host = coordinator_host
        return RelayOffer(relay_id=COORDINATOR_RELAY, address=_join(host, self.relay_port))

    def _volunteers(self, online, node_id: str) -> list[RelayOffer]:
        load: dict[str, int] = {}
        for n in online:
            if n.reachability == "relayed":
                load[n.relay_node_id] = load.get(n.relay_node_id, 0) + 1
        return [RelayOffer(relay_id=n.id, address=n.relay_address, peer_address=n.peer_address,
                           num_relayed=load.get(n.id, 0), rtt_s=self._rtt_s.get(n.id, float("inf")))
                for n in online if n.relay_address and n.reachability == "direct" and n.id != node_id]

    def check(self, node_id: str, *, peer: str, coordinator_host: str) -> pb.ReachabilityReply:
        """Dial the node back and record the decision. CapacityError when it is unreachable and
        no relay is available (its message says what to do)."""
        node = self.app.registry.get(node_id)
        advertised = node.advertised_address or node.peer_address
        if coordinator_host:
            parse_address(_join(coordinator_host, 1))  # a host, nothing else
        ok, rtt_s, error = dial_node(advertised, node_id, security=self.app.security)
        if ok:
            self._rtt_s[node_id] = rtt_s
        online = self.app.registry.online()
        held = self.app.admission.held_by_other(advertised, node_id, online)
        if held is not None:
            error = f"address {advertised} is held by another online node ({held[:8]})"
        try:
            d = decide(advertised=advertised, dial_ok=ok, held_by_other=held is not None,
                       volunteers=self._volunteers(online, node_id),
                       coordinator_relay=self._coordinator_offer(coordinator_host))
        except ValueError as exc:
            raise CapacityError(
                f"node {node_id[:12]} is not reachable at {advertised} ({error}) and this coordinator offers no relay: "
                "ask its operator to start it with --relay-port, or start a reachable node with --relay") from exc
        relay_id = d.relay.relay_id if d.relay else ""
        seen = observed_address(peer)
        self.app.registry.set_reachability(node_id, reachability=d.reachability, published_address=d.published_address,
                                           observed_address=seen, relay_node_id=relay_id)
        return pb.ReachabilityReply(
            reachability=d.reachability, advertised_address=advertised, observed_address=seen,
            published_address=d.published_address, relay_address=d.relay.address if d.relay else "",
            relay_node_id=relay_id, dial_error="" if d.reachability == "direct" else error,
            relay_peer_address=d.relay.peer_address if d.relay else "",
        )

    def usage(self) -> dict:
        """Relay traffic of the coordinator's relay port (status page, /api/relay)."""
        return {"relay_port": self.relay_port, "rate_Bps": self.hub.limits.rate_Bps,
                "listening": self.hub.listening(), "bytes": self.hub.usage()}


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
