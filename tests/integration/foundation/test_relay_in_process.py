"""Relaying in one process: a real coordinator with its relay port, a node nobody can dial
(it advertises an address where nothing listens) and a reachable one. The coordinator's
dial-back proves ids over mTLS; the unreachable node is relayed, and real mTLS gRPC calls,
link probes included, reach it through the relay, which only splices bytes."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from coordinator.reachability import dial_node
from node.agent import NodeAgent, NodeConfig
from swarm.errors import SwarmError
from swarm.localswarm import wait_until
from swarm.membership import link_json, link_paths
from swarm.proto.v1 import peer_pb2, peer_pb2_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, data_channel, make_server
from swarm.transport.errors import translate_rpc_errors

from tests.helpers.foundation import HW
from tests.helpers.tls import TestPki


def agent(app, tmp_path, name, **kw) -> NodeAgent:
    config = NodeConfig(coordinator_address=f"127.0.0.1:{app.grpc_port}", token=app.join_token,
                        state_dir=tmp_path / name, name=name, host="127.0.0.1", plugins=(), **kw)
    return NodeAgent(config, hardware=HW)


def ping(address: str, node_id: str, security) -> str:
    with data_channel(address, security=security, node_id=node_id) as ch:
        with translate_rpc_errors(f"node at {address}"):
            return peer_pb2_grpc.PeerStub(ch).Ping(peer_pb2.PingRequest(payload=b"hi"), timeout=10).node_id


@pytest.mark.timeout(90)
def test_unreachable_node_is_relayed_and_reached_through_the_relay(app, tmp_path):
    assert app.reachability.relay_port > 0
    direct = agent(app, tmp_path, "direct")
    natted = agent(app, tmp_path, "natted", advertise_host="127.0.0.3")  # nothing listens there
    for a in (direct, natted):
        a.start()
    try:
        assert direct.wait_registered(20) and natted.wait_registered(20)
        nodes = {n.id: n for n in app.registry.snapshot()}
        d, r = nodes[direct.node_id], nodes[natted.node_id]
        assert (d.reachability, d.peer_address) == ("direct", direct.peer_address)
        assert r.reachability == "relayed" and r.relay_node_id == "coordinator"
        assert r.peer_address == f"127.0.0.1:{app.reachability.relay_port}"  # what peers dial now
        assert r.observed_address.startswith("127.0.0.1:")
        assert natted.relay.reachability == "relayed"
        # a peer (the other node's certificate) calls the relayed node through the relay, over mTLS end to end
        assert ping(r.peer_address, natted.node_id, direct.security) == natted.node_id
        # the relay routes by the name asked for: the direct node is not listening there
        with pytest.raises(SwarmError):
            ping(r.peer_address, direct.node_id, natted.security)
        # garbage and a silent connection do not freeze the relay
        silent = socket.create_connection(("127.0.0.1", app.reachability.relay_port))
        with socket.create_connection(("127.0.0.1", app.reachability.relay_port)) as junk:
            junk.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert junk.recv(10) == b""  # closed
        assert ping(r.peer_address, natted.node_id, direct.security) == natted.node_id
        silent.close()
        # the coordinator measures links over the path traffic takes: both directions, through the relay
        ids = [direct.node_id, natted.node_id]

        def measured():
            _, bw, _ = app.network.matrix(ids)
            return bw[0, 1] > 0 and bw[1, 0] > 0

        wait_until(measured, 40, message="both directions measured")
        req = urllib.request.Request(f"http://127.0.0.1:{app.http_port}/api/relay",
                                     headers={"Authorization": f"Bearer {app.read_token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            relay = json.loads(resp.read())
        assert relay["listening"] == [natted.node_id]
        used = relay["bytes"][natted.node_id]
        assert used["to_node"] > app.measurements.policy.probe_bytes  # the probe crossed the relay
        path = link_paths(app.registry.snapshot())
        paths = {(lk.src, lk.dst): link_json(lk, path)["path"] for lk in app.network.links()}
        assert paths[(direct.node_id, natted.node_id)] == "relayed"  # into the NAT: relayed
        assert paths[(natted.node_id, direct.node_id)] == "direct"  # out of it: dialled directly
    finally:
        for a in (natted, direct):
            a.stop()


def test_dial_back_proves_the_id_over_mtls(tmp_path):
    pki = TestPki(tmp_path / "ca")
    c, other = "c" * 32, "d" * 32
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)

    class Peer(peer_pb2_grpc.PeerServicer):
        def Ping(self, request, context):
            return peer_pb2.PingReply(node_id=c, payload=request.payload)

    peer_pb2_grpc.add_PeerServicer_to_server(Peer(), server)
    port = bind(server, "127.0.0.1", 0, security=pki.node(c))
    server.start()
    try:
        ok, rtt, err = dial_node(f"127.0.0.1:{port}", c, security=pki.coordinator())
        assert ok and rtt > 0 and err == ""
        # a node advertising another's address cannot prove ITS id there: the certificate names c
        ok, _, err = dial_node(f"127.0.0.1:{port}", other, security=pki.coordinator())
        assert not ok and err
    finally:
        server.stop(0)


@pytest.mark.timeout(60)
def test_a_volunteer_relay_is_preferred_and_relays_end_to_end(app, tmp_path):
    volunteer = agent(app, tmp_path, "volunteer", relay_port=0)  # swarm-node join --relay
    natted = agent(app, tmp_path, "natted2", advertise_host="127.0.0.4")
    volunteer.start()
    try:
        assert volunteer.wait_registered(20)
        natted.start()
        assert natted.wait_registered(20)
        r = app.registry.get(natted.node_id)
        assert r.reachability == "relayed" and r.relay_node_id == volunteer.node_id
        assert r.peer_address == f"127.0.0.1:{volunteer.relay.relay_port}"
        # the coordinator (a peer like any other here) reaches it through the volunteer's relay port
        assert ping(r.peer_address, natted.node_id, app.security) == natted.node_id
        assert volunteer.relay.metrics()["relayed_bytes"] > 0
    finally:
        natted.stop()
        volunteer.stop()


@pytest.mark.timeout(60)
def test_unreachable_without_any_relay_stays_pending_and_says_what_to_do(tmp_path, caplog):
    from coordinator.app import CoordinatorApp, CoordinatorConfig

    app = CoordinatorApp(CoordinatorConfig(state_dir=tmp_path / "coord", heartbeat_interval_s=0.2, node_timeout_s=1.5,
                                           sweep_interval_s=0.1, plugins=(), relay_port=None))
    app.start()
    natted = agent(app, tmp_path, "alone", advertise_host="127.0.0.5")
    try:
        with caplog.at_level("ERROR", logger="node.relay_link"):
            natted.start()
            assert natted.wait_registered(20)
        assert app.registry.get(natted.node_id).reachability == "pending"
        assert natted.node_id not in {n.id for n in app.registry.online()}  # no work, no peer sent to it
        assert any("--relay-port" in r.getMessage() and "--relay" in r.getMessage() for r in caplog.records)
    finally:
        natted.stop()
        app.stop(grace_s=0.2)
