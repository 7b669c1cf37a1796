"""Peer traffic counters (node/traffic.py), their validation at the coordinator, and the rule
turning transfer observations into links (coordinator/network.py transfer_link)."""

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from coordinator.network import transfer_link
from coordinator.servicer import MAX_TRAFFIC_BYTES, check_traffic_metrics, check_transfers
from node.traffic import MIN_OBSERVED_BYTES, Traffic
from node.training.exchange import Endpoint, Endpoints, PipelinePeerServicer
from node.training.sender import PeerSender
from node.training.worker import StageWorker
from swarm.errors import InvalidRequestError
from swarm.hardware import HardwareInfo
from swarm.identity import NODE_ID_HEX_CHARS
from swarm.membership import Link, NodeInfo, node_json
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport import tensors as wt
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server

A, B = "a" * NODE_ID_HEX_CHARS, "b" * NODE_ID_HEX_CHARS


def test_counters_are_thread_safe_and_ignore_non_positive():
    t = Traffic()

    def work():
        for _ in range(1000):
            t.add_sent(3)
            t.add_received(5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.add_sent(0)
    t.add_received(-7)
    assert t.totals() == {"bytes_sent": 12_000, "bytes_received": 20_000}


def test_observations_need_a_meaningful_size_and_are_bounded():
    t = Traffic(max_observations=4)
    assert not t.observe(B, MIN_OBSERVED_BYTES - 1, 0.01)
    assert not t.observe(B, MIN_OBSERVED_BYTES, 0.0)
    assert not t.observe(B, MIN_OBSERVED_BYTES, math.nan)
    assert not t.observe("", MIN_OBSERVED_BYTES, 0.01)
    for i in range(6):
        assert t.observe(B, MIN_OBSERVED_BYTES + i, 0.01)
    got = t.drain()
    assert [o.num_bytes - MIN_OBSERVED_BYTES for o in got] == [2, 3, 4, 5]  # newest kept, oldest first
    assert t.drain() == []


def test_traffic_metrics_validation():
    check_traffic_metrics({})
    check_traffic_metrics({"bytes_sent": 0, "bytes_received": MAX_TRAFFIC_BYTES, "other": -1})
    for bad in (-1, 1.5, "12", True, None, MAX_TRAFFIC_BYTES + 1, [1]):
        with pytest.raises(InvalidRequestError, match="bytes_sent"):
            check_traffic_metrics({"bytes_sent": bad})
    with pytest.raises(InvalidRequestError, match="bytes_received"):
        check_traffic_metrics({"bytes_received": -5})


def _obs(dst=B, n=1 << 20, s=0.01):
    return pb.TransferObservation(dst_node_id=dst, num_bytes=n, seconds=s)


def test_transfer_observation_validation():
    assert check_transfers([_obs(), _obs(n=2 << 20)], A) == {B: [(1 << 20, 0.01), (2 << 20, 0.01)]}
    assert check_transfers([], A) == {}
    for bad, match in ((_obs(dst="nope"), "dst_node_id"), (_obs(dst=A), "dst_node_id"), (_obs(n=0), "num_bytes"),
                       (_obs(n=-3), "num_bytes"), (_obs(s=0.0), "seconds"), (_obs(s=math.inf), "seconds"),
                       (_obs(s=math.nan), "seconds"), (_obs(s=1e9), "seconds"), (_obs(n=1 << 40, s=1e-9), "plausible")):
        with pytest.raises(InvalidRequestError, match=match):
            check_transfers([bad], A)
    with pytest.raises(InvalidRequestError, match="at most"):
        check_transfers([_obs()] * 65, A)


def _link(bw, source="probe", at=100.0):
    return Link(src=A, dst=B, delay_s=0.01, rtt_s=0.02, bandwidth_Bps=bw, measured_at_s=at, source=source)


def test_transfer_link_only_raises_bandwidth_and_keeps_delay():
    assert transfer_link(None, [(1 << 20, 0.01)], 200.0) is None  # no probe yet: no delay to keep
    assert transfer_link(_link(1e6), [], 200.0) is None
    # lower bounds below a known (fresher or not) bandwidth never overwrite it
    assert transfer_link(_link(1e9), [(1 << 20, 0.01)], 200.0) is None
    assert transfer_link(_link(1e9, source="transfer"), [(1 << 20, 0.01)], 200.0) is None
    link = transfer_link(_link(1e6), [(1 << 20, 0.1), (1 << 20, 0.01), (1 << 20, 0.5)], 200.0)
    assert link.source == "transfer" and link.measured_at_s == 200.0
    assert link.bandwidth_Bps == pytest.approx((1 << 20) / 0.01)  # the max: the tightest lower bound
    assert (link.delay_s, link.rtt_s, link.src, link.dst) == (0.01, 0.02, A, B)


def test_node_json_exposes_valid_totals_only():
    hw = HardwareInfo(device="cpu", device_kind="cpu", device_name="x", memory_bytes=1 << 30, memory_free_bytes=1 << 29,
                      cpu_cores=2, ram_bytes=1 << 30, disk_free_bytes=1 << 30, tflops=0.1, tflops_dtype="float32")
    node = NodeInfo(id=A, name="n", state="online", hardware=hw, peer_address="127.0.0.1:1", registered_at_s=0,
                    last_seen_at_s=0, metrics={"bytes_sent": 10, "bytes_received": 20})
    j = node_json(node, 1.0)
    assert (j["bytes_sent"], j["bytes_received"]) == (10, 20)
    old = NodeInfo(id=A, name="n", state="online", hardware=hw, peer_address="127.0.0.1:1", registered_at_s=0,
                   last_seen_at_s=0, metrics={"bytes_sent": "lots"})
    assert (node_json(old, 1.0)["bytes_sent"], node_json(old, 1.0)["bytes_received"]) == (None, None)


def test_a_real_push_is_counted_on_both_sides_and_observed(tmp_path):
    """A 512 KiB tensor through a real PipelinePeer server: the receiver counts it, the sender's
    StageWorker hook counts it and keeps a link observation."""
    shape = (128, 1024)
    recv_traffic, send_traffic = Traffic(), Traffic()
    endpoints = Endpoints()
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    from swarm.transport.tls import TlsSecurity
    from tests.helpers.tls import TestPki

    pki = TestPki(tmp_path / "ca")  # TLS as in a swarm: the sender is node "a"*32, the receiver B
    training_pb2_grpc.add_PipelinePeerServicer_to_server(
        PipelinePeerServicer(endpoints, traffic=recv_traffic, identify=TlsSecurity.peer_identity), srv)
    port = bind(srv, "127.0.0.1", 0, security=pki.node(B))
    srv.start()
    ep = Endpoint("job", lambda h, p: wt.raw_decode(p, shape=h.shape, dtype=h.dtype))
    endpoints.add(ep)
    on_sent = StageWorker._on_sent(SimpleNamespace(traffic=send_traffic), B)
    sender = PeerSender(f"127.0.0.1:{port}", security=pki.node("a" * 32), node_id=B, what="peer", timeout_s=10,
                        on_sent=on_sent)
    try:
        t = torch.randn(*shape)
        payload = wt.raw_encode(t)
        h = wt.make_header(payload, job_id="job", step=0, micro_batch=0, shape=shape, dtype="float32",
                           kind="activation", sender_id="a" * 32)
        sender.send(wt.WireTensor(header=h, payload=payload))
        sender.flush()
        got = ep.get("activation", 0, 0, timeout_s=5, stop=threading.Event(), what="peer")
        assert torch.equal(got, t)
    finally:
        sender.close()
        srv.stop(0)
    n = len(payload)
    assert n == 512 << 10
    assert recv_traffic.totals() == {"bytes_sent": 0, "bytes_received": n}
    assert send_traffic.totals() == {"bytes_sent": n, "bytes_received": 0}
    (obs,) = send_traffic.drain()
    assert obs.dst_node_id == B and obs.num_bytes == n and 0 < obs.seconds < 10
