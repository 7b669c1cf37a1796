"""A node's pipeline peer server in process: PushTensor and the persistent tensor streams on
127.0.0.1:0 over TLS, feeding an Endpoints registry (what node/training/__init__.py serves)."""

from __future__ import annotations

from swarm.proto.v1 import training_pb2_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server
from swarm.transport.tls import TlsSecurity

from node.training.exchange import Endpoints, PipelinePeerServicer


def start_peer_server(security):
    """(server, endpoints, "127.0.0.1:port"); the caller stops the server."""
    endpoints = Endpoints()
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    peer = PipelinePeerServicer(endpoints, identify=TlsSecurity.peer_identity)
    training_pb2_grpc.add_PipelinePeerServicer_to_server(peer, srv)
    srv.add_generic_rpc_handlers((peer.stream_receiver().handler(),))
    port = bind(srv, "127.0.0.1", 0, security=security)
    srv.start()
    return srv, endpoints, f"127.0.0.1:{port}"
