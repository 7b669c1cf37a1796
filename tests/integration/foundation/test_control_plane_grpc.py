"""Register / heartbeat / leave / errors against a real in-process coordinator."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.auth import api_token_metadata, call_metadata

from swarm.transport.convert import hardware_to_proto

from tests.helpers.foundation import HW, make_register

A = Identity.from_seed(b"node-a")
B = Identity.from_seed(b"node-b")


def code_of(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_register_heartbeat_leave(app, stub):
    reply = stub.Register(make_register(app, A), timeout=5)
    assert reply.node_id == A.node_id and reply.session and reply.heartbeat_interval_s == 0.2
    md = call_metadata(A.node_id, reply.session)
    hb = stub.Heartbeat(pb.HeartbeatRequest(status="busy", metrics_json='{"stage": 2}'), metadata=md, timeout=5)
    assert hb.heartbeat_interval_s == 0.2
    node = app.registry.get(A.node_id)
    assert node.state == "online" and node.status == "busy" and node.metrics == {"stage": 2}
    listed = stub.ListNodes(pb.ListNodesRequest(), timeout=5, metadata=api_token_metadata(app.read_token))
    assert [n.node_id for n in listed.nodes] == [A.node_id]
    stub.Leave(pb.LeaveRequest(reason="test"), metadata=md, timeout=5)
    assert app.registry.get(A.node_id).state == "left"
    # the session ends with the leave
    assert code_of(stub.Heartbeat, pb.HeartbeatRequest(), metadata=md, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_registration_errors_have_codes_and_advice(app, stub):
    code, msg = code_of(stub.Register, make_register(app, A, token="wrong-token"), timeout=5)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in msg
    code, msg = code_of(stub.Register, make_register(app, A, version="2.0"), timeout=5)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "upgrade" in msg
    bad_sig = make_register(app, A)
    bad_sig.signature = B.sign(bad_sig.payload)
    assert code_of(stub.Register, bad_sig, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED
    other_key = make_register(app, A)
    other_key.public_key = B.public_key  # signature by A does not verify under B's key
    assert code_of(stub.Register, other_key, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED
    code, msg = code_of(stub.Register, make_register(app, A, timestamp=1.0), timeout=5)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "clock" in msg
    code, _ = code_of(stub.Register, pb.RegisterRequest(payload=b"\xff\xff\xff", token=app.join_token), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Register, make_register(app, A, name="bad name!"), timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Register, make_register(app, A, address="nowhere"), timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    hw = make_register(app, A)
    payload = pb.RegistrationPayload.FromString(hw.payload)
    payload.hardware.tflops = float("nan")
    hw.payload = payload.SerializeToString()
    hw.signature = A.sign(hw.payload)
    code, msg = code_of(stub.Register, hw, timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tflops" in msg
    # replaying a registration is refused
    req = make_register(app, B)
    stub.Register(req, timeout=5)
    assert code_of(stub.Register, req, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED
    # none of that hurt the service
    assert [n.node_id for n in stub.ListNodes(pb.ListNodesRequest(), timeout=5, metadata=api_token_metadata(app.read_token)).nodes] == [B.node_id]


def test_calls_are_tied_to_the_registered_identity(app, stub):
    session_a = stub.Register(make_register(app, A), timeout=5).session
    session_b = stub.Register(make_register(app, B), timeout=5).session
    hb = pb.HeartbeatRequest()
    assert code_of(stub.Heartbeat, hb, timeout=5)[0] == grpc.StatusCode.UNAUTHENTICATED
    # B's session does not work for A's id
    assert code_of(stub.Heartbeat, hb, metadata=call_metadata(A.node_id, session_b), timeout=5)[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.Heartbeat, hb, metadata=call_metadata("zz", session_a), timeout=5)[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    md = call_metadata(A.node_id, session_a)
    bad_metrics = pb.HeartbeatRequest(metrics_json="[1,2]")
    assert code_of(stub.Heartbeat, bad_metrics, metadata=md, timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    report = pb.MeasurementReport(task_id="nope", dst_node_id=B.node_id, rtt_s=0.1, bandwidth_Bps=1e6)
    assert code_of(stub.ReportMeasurement, report, metadata=md, timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad_value = pb.MeasurementReport(task_id="x", dst_node_id=B.node_id, rtt_s=-1, bandwidth_Bps=1e6)
    assert code_of(stub.ReportMeasurement, bad_value, metadata=md, timeout=5)[0] == grpc.StatusCode.INVALID_ARGUMENT
    stub.Heartbeat(hb, metadata=md, timeout=5)


def test_oversized_message_is_refused(app, stub):
    huge = pb.RegisterRequest(payload=b"x" * (17 << 20), token=app.join_token)
    assert code_of(stub.Register, huge, timeout=10)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    too_big_payload = pb.RegisterRequest(payload=b"x" * (20 << 10), token=app.join_token)
    assert code_of(stub.Register, too_big_payload, timeout=10)[0] == grpc.StatusCode.INVALID_ARGUMENT
    stub.ListNodes(pb.ListNodesRequest(), timeout=5, metadata=api_token_metadata(app.read_token))


def test_http_api(app, stub):
    stub.Register(make_register(app, A), timeout=5)
    base = f"http://127.0.0.1:{app.http_port}"
    auth = {"Authorization": f"Bearer {app.read_token}"}
    with urllib.request.urlopen(urllib.request.Request(base + "/api/nodes", headers=auth), timeout=5) as resp:
        nodes = json.loads(resp.read())["nodes"]
    assert {"id", "name", "state", "device", "memory_bytes", "tflops", "last_seen_s"} <= set(nodes[0])
    assert nodes[0]["id"] == A.node_id and nodes[0]["tflops"] == 0.25
    with urllib.request.urlopen(urllib.request.Request(base + "/api/network", headers=auth), timeout=5) as resp:
        net = json.loads(resp.read())
    assert net["node_ids"] == [A.node_id] and net["delay_s"] == [[0.0]] and net["links"] == []


def test_node_limit_is_resource_exhausted(app, stub):
    import dataclasses

    app.config = dataclasses.replace(app.config, max_nodes=1)
    stub.Register(make_register(app, A), timeout=5)
    stub.Register(make_register(app, A), timeout=5)  # a known node may always re-register
    code, msg = code_of(stub.Register, make_register(app, B), timeout=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg


def test_a_starved_bandwidth_probe_registers_and_an_inflated_one_is_refused(app, stub):
    """A node whose memory-bandwidth probe crawled (a loaded box) registers as unmeasured; one
    over 5e13 bytes/s is refused with what to do (swarm.hardware.reported_mem_bandwidth)."""
    hw = hardware_to_proto(HW)
    hw.mem_bandwidth_Bps = 4e6
    stub.Register(make_register(app, A, hardware=hw), timeout=5)
    assert app.registry.get(A.node_id).hardware.mem_bandwidth_Bps == 0.0
    hw.mem_bandwidth_Bps = 9e13
    code, msg = code_of(stub.Register, make_register(app, B, hardware=hw), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "restart swarm-node join" in msg, msg
