"""Persistent tensor streams (swarm/transport/streams.py): framing, acks, refusals, re-sends."""

import threading

import pytest
import torch

from swarm.errors import InvalidRequestError, PeerError
from swarm.proto.v1 import training_pb2
from swarm.transport import frames, streams
from swarm.transport import tensors as wt


from node.training.exchange import Endpoint
from node.training.sender import PeerSender
from tests.helpers.peer_server import start_peer_server
from tests.helpers.tls import TestPki

pytestmark = pytest.mark.timeout(60)
SHAPE = (2, 4, 8)
A, B, C = "a" * 32, "b" * 32, "c" * 32  # sender, receiver, a third node


def _validate(h: wt.TensorHeader, payload) -> torch.Tensor:
    wt.validate_header(h, wt.TensorExpectation(job_id="job", kind="activation", shape=SHAPE, dtype="float32"))
    return wt.raw_decode(bytes(payload), shape=h.shape, dtype=h.dtype)


def _header(parts, *, mb=0, shape=SHAPE, sender=A):
    return frames.payload_header(parts, job_id="job", step=0, micro_batch=mb, shape=shape, dtype="float32",
                                  kind="activation", sender_id=sender)


def test_frame_is_the_protobuf_message_and_round_trips():
    t = torch.randn(*SHAPE)
    parts = [b"", memoryview(t.numpy()).cast("B")]
    h = _header(parts)
    frame = frames.encode_frame(7, h, parts)
    msg = training_pb2.TensorFrame.FromString(frame)  # any protobuf reader understands it
    assert msg.seq == 7 and msg.payload == t.numpy().tobytes() and msg.header.payload_crc32 == h.payload_crc32
    seq, h2, payload = frames.decode_frame(frame, max_payload_bytes=1 << 20)
    assert seq == 7 and h2 == h and bytes(payload) == t.numpy().tobytes()
    assert frames.decode_ack(training_pb2.TensorFrameAck(seq=300).SerializeToString()) == 300
    corrupt = bytearray(frame)
    corrupt[-1] ^= 1
    with pytest.raises(InvalidRequestError, match="checksum"):
        frames.decode_frame(bytes(corrupt), max_payload_bytes=1 << 20)
    with pytest.raises(InvalidRequestError, match="exceeds"):
        frames.decode_frame(frame, max_payload_bytes=16)


def test_receiver_applies_a_resent_frame_once():
    got = []
    rx = streams.StreamReceiver(lambda caller, h, p: got.append((caller, h.micro_batch)), identify=lambda ctx: A)

    class Ctx:
        def invocation_metadata(self):
            return ((streams.STREAM_ID_KEY, "s1"),)

    sent = []
    for mb in range(3):
        parts = [torch.full(SHAPE, float(mb)).numpy().tobytes()]
        sent.append(frames.encode_frame(mb + 1, _header(parts, mb=mb), parts))
    acks = list(rx.Open(iter(sent[:2]), Ctx()))
    acks += list(rx.Open(iter(sent[1:]), Ctx()))  # a reconnected stream re-sends frame 2
    assert [frames.decode_ack(a) for a in acks] == [1, 2, 2, 3]
    assert got == [(A, 0), (A, 1), (A, 2)]


@pytest.fixture()
def pki(tmp_path):
    return TestPki(tmp_path / "ca")


@pytest.fixture()
def sec_a(pki):
    return pki.node(A)


@pytest.fixture()
def server(pki):
    srv, endpoints, address = start_peer_server(pki.node(B))
    yield endpoints, address
    srv.stop(0)


def test_stream_carries_tensors_in_order_and_refusals_fail_the_sender(server, sec_a):
    endpoints, address = server
    ep = Endpoint("job", _validate)
    endpoints.add(ep)
    stop = threading.Event()
    sent = []
    sender = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=5, max_queued=2,
                        on_sent=lambda n, s: sent.append(n))
    tensors = [torch.randn(*SHAPE) for _ in range(6)]
    for mb, t in enumerate(tensors):
        parts = [memoryview(t.numpy()).cast("B")]
        sender.send(wt.WireTensor(header=_header(parts, mb=mb), payload=t.numpy().tobytes()))
    sender.flush()
    assert not sender._stream.unsupported and sender._stream.num_unacked == 0
    for mb, t in enumerate(tensors):
        assert torch.equal(ep.get("activation", 0, mb, timeout_s=5, stop=stop, what="peer"), t)
    assert sent == [t.numel() * 4 for t in tensors]
    bad = torch.zeros(2, 4, 9)
    sender.send(wt.WireTensor(header=_header([bad.numpy().tobytes()], mb=7, shape=(2, 4, 9)),
                              payload=bad.numpy().tobytes()))
    with pytest.raises(PeerError, match="shape"):
        sender.flush()
    assert ep.num_rejected == 1
    sender.close()


def test_stream_waits_for_a_stage_that_is_not_there_yet(server, sec_a):
    endpoints, address = server
    sender = PeerSender(address, security=sec_a, node_id=B, what="peer", timeout_s=10)
    t = torch.ones(*SHAPE)
    sender.send(wt.WireTensor(header=_header([t.numpy().tobytes()]), payload=t.numpy().tobytes()))
    ep = Endpoint("job", _validate)
    threading.Timer(0.5, endpoints.add, args=(ep,)).start()
    sender.flush()
    assert sender._stream.reconnects >= 1
    assert torch.equal(ep.get("activation", 0, 0, timeout_s=5, stop=threading.Event(), what="p"), t)
    sender.close()


def test_stream_refuses_a_tensor_sent_in_another_nodes_name_and_changes_nothing(server, pki):
    """The caller comes from its certificate: node C cannot put a tensor from A on a stream."""
    endpoints, address = server
    ep = Endpoint("job", _validate)
    endpoints.add(ep)
    forger = PeerSender(address, security=pki.node(C), node_id=B, what="peer", timeout_s=5)
    t = torch.randn(*SHAPE)
    forger.send(wt.WireTensor(header=_header([t.numpy().tobytes()], sender=A), payload=t.numpy().tobytes()))
    with pytest.raises(PeerError, match="in the name of"):
        forger.flush()
    forger.close()
    assert ep.num_rejected == 0  # refused before any bookkeeping
    honest = PeerSender(address, security=pki.node(A), node_id=B, what="peer", timeout_s=5)
    honest.send(wt.WireTensor(header=_header([t.numpy().tobytes()], sender=A), payload=t.numpy().tobytes()))
    honest.flush()
    honest.close()
    assert torch.equal(ep.get("activation", 0, 0, timeout_s=5, stop=threading.Event(), what="peer"), t)
