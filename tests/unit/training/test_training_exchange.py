"""The pipeline data plane in process: a real gRPC server with PipelinePeerServicer, real stubs."""

import threading

import pytest
import torch

from swarm.errors import InvalidRequestError, PeerError
from swarm.transport import tensors as wt
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server
from swarm.proto.v1 import training_pb2_grpc

from node.training.exchange import Endpoint, Endpoints, PipelinePeerServicer
from node.training.sender import PeerSender
from swarm.transport.tls import TlsSecurity
from tests.helpers.tls import TestPki

SHAPE = (2, 4, 8)
A, B = "a" * 32, "b" * 32  # the sending node (its certificate names it) and the receiving one


def _validate(h: wt.TensorHeader, payload: bytes) -> torch.Tensor:
    wt.validate_header(h, wt.TensorExpectation(job_id="job", kind="activation", shape=SHAPE, dtype="float32"))
    return wt.raw_decode(payload, shape=h.shape, dtype=h.dtype)


def _wire(t: torch.Tensor, *, step=0, mb=0, job="job") -> wt.WireTensor:
    payload = wt.raw_encode(t)
    h = wt.make_header(payload, job_id=job, step=step, micro_batch=mb, shape=tuple(t.shape), dtype="float32",
                       kind="activation", sender_id=A)
    return wt.WireTensor(header=h, payload=payload)


@pytest.fixture()
def pki(tmp_path):
    return TestPki(tmp_path / "ca")


@pytest.fixture()
def sec_a(pki):
    return pki.node(A)


@pytest.fixture()
def server(pki):
    endpoints = Endpoints()
    srv = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    training_pb2_grpc.add_PipelinePeerServicer_to_server(
        PipelinePeerServicer(endpoints, identify=TlsSecurity.peer_identity), srv)
    port = bind(srv, "127.0.0.1", 0, security=pki.node(B))
    srv.start()
    yield endpoints, f"127.0.0.1:{port}"
    srv.stop(0)


def test_good_tensor_arrives_and_bad_ones_are_rejected(server, sec_a):
    endpoints, address = server
    ep = Endpoint("job", _validate)
    endpoints.add(ep)
    stop = threading.Event()
    good = torch.randn(*SHAPE)
    sender = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=5)
    sender.send(_wire(good))
    sender.flush()
    got = ep.get("activation", 0, 0, timeout_s=5, stop=stop, what="peer")
    assert torch.equal(got, good)
    for bad, reason in ((torch.zeros(2, 4, 9), "shape"), (torch.full(SHAPE, float("nan")), "NaN")):
        s = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=5)
        s.send(_wire(bad, mb=1))
        with pytest.raises(PeerError, match=reason):
            s.flush()
        s.close()
    assert ep.num_rejected == 2
    # duplicates are refused too, and nothing rejected was queued
    sender.send(_wire(good, mb=2))
    sender.flush()
    s = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=5)
    s.send(_wire(good, mb=2))
    with pytest.raises(PeerError, match="duplicate"):
        s.flush()
    with pytest.raises(PeerError, match="within"):
        ep.get("activation", 0, 1, timeout_s=0.3, stop=stop, what="peer")
    sender.close()
    s.close()


def test_sender_retries_until_the_stage_exists(server, sec_a):
    endpoints, address = server
    sender = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=10)
    sender.send(_wire(torch.ones(*SHAPE)))
    ep = Endpoint("job", _validate)
    threading.Timer(0.5, endpoints.add, args=(ep,)).start()
    sender.flush()
    assert torch.equal(ep.get("activation", 0, 0, timeout_s=5, stop=threading.Event(), what="p"), torch.ones(*SHAPE))
    sender.close()


def test_sender_gives_up_on_a_dead_peer(sec_a):
    sender = PeerSender("127.0.0.1:1", security=sec_a, what="dead peer", timeout_s=1.0)
    sender.send(_wire(torch.ones(*SHAPE)))
    with pytest.raises(PeerError, match="dead peer"):
        sender.flush(timeout_s=10)
    sender.close()


def test_stop_interrupts_a_wait():
    ep = Endpoint("job", _validate)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(PeerError, match="stopped"):
        ep.get("activation", 0, 0, timeout_s=30, stop=stop, what="p")
    with pytest.raises(InvalidRequestError):
        ep.accept(_wire(torch.zeros(1, 1, 1)).header, wt.raw_encode(torch.zeros(1, 1, 1)))


def test_header_precheck_refuses_before_the_payload_is_read(server, sec_a):
    endpoints, address = server
    seen_payload = []

    def validate(h, payload):
        seen_payload.append(len(payload))
        return _validate(h, payload)

    def precheck(h):
        wt.validate_header(h, wt.TensorExpectation(job_id="job", kind="activation", shape=SHAPE))

    ep = Endpoint("job", validate, precheck=precheck)
    endpoints.add(ep)
    s = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=5)
    s.send(_wire(torch.zeros(64, 64, 64)))  # 1 MiB, several chunks, wrong shape
    with pytest.raises(PeerError, match="shape"):
        s.flush()
    s.close()
    assert ep.num_rejected == 1 and seen_payload == []
