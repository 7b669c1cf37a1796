"""Read-only client of the coordinator's control plane (used by ``swarm status``).

Node-side calls (register, heartbeat...) live in ``node.coordinator_link``; this module only
lists nodes and links and returns domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.membership import Link, NodeInfo
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.transport.channels import control_channel, parse_address
from swarm.transport.convert import link_from_proto, node_from_proto
from swarm.transport.errors import translate_rpc_errors


@dataclass(frozen=True, slots=True, kw_only=True)
class SwarmSnapshot:
    nodes: tuple[NodeInfo, ...]
    links: tuple[Link, ...]
    server_time_s: float


def fetch_snapshot(address: str, *, timeout_s: float = 10.0) -> SwarmSnapshot:
    """Nodes and links from the coordinator at ``address``. Raises UnavailableError etc."""
    parse_address(address)
    with control_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        what = f"coordinator at {address}"
        with translate_rpc_errors(what):
            nodes = stub.ListNodes(pb.ListNodesRequest(), timeout=timeout_s)
            network = stub.GetNetwork(pb.GetNetworkRequest(), timeout=timeout_s)
    return SwarmSnapshot(
        nodes=tuple(node_from_proto(n) for n in nodes.nodes),
        links=tuple(link_from_proto(link) for link in network.links),
        server_time_s=nodes.server_time_s,
    )
