"""The step wire (swarm/transport/step_wire.py): a chain's steps over one TLS socket per link give
the same tokens as one process, with the same authorization as StepStream; malformed or
unauthenticated connections are refused without harming the server; a link whose wire cannot be
reached carries on over gRPC."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time

import pytest

from swarm.errors import AuthError, PermissionDeniedError
from swarm.inference.local import generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import data_channel
from swarm.transport.inference import step_metadata
from swarm.transport.step_link import StepLink
from swarm.transport.spin import ENDPOINTS
from swarm.transport.step_wire import ERROR, HEADER, HELLO, READY, STEP, WireServer, WireTarget, read_frame, wire_target
from tests.helpers.tls import TestPki
from tests.unit.inference.test_step_stream import CAP, _id, assignment, start_stage_server, step_request


def start_stage(pki, tmp_path, name, ckpt):
    server, address = start_stage_server(pki, tmp_path, name, ckpt)
    servicer = server.servicer
    wire = WireServer(security=servicer.security, host="127.0.0.1", port=0, serve_stream=servicer.StepStream).start()
    servicer.wire = wire
    return server, wire, address


@pytest.fixture
def chain(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    pki = TestPki(tmp_path / "ca")
    s1, w1, a1 = start_stage(pki, tmp_path, "b", d)
    s0, w0, a0 = start_stage(pki, tmp_path, "a", d)
    coord = pki.coordinator()
    c0 = data_channel(a0, security=coord, node_id=_id("a"))
    c1 = data_channel(a1, security=coord, node_id=_id("b"))
    st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
    st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3, prev_node=_id("a"))), timeout=30)
    st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1, next_node=_id("b"))), timeout=30)
    yield dict(pki=pki, coord=coord, ckpt=d, st0=st0, st1=st1, a0=a0, a1=a1, w0=w0, w1=w1, s0=s0, s1=s1)
    for c in (c0, c1):
        c.close()
    for w in (w0, w1):
        w.stop()
    for s in (s0, s1):
        s.stop(0)


def _link(c, metadata=step_metadata(CAP), security=None, node="a", stub="st0", address="a0"):
    return StepLink(c[stub].StepStream, metadata=metadata, what=f"stage {node}",
                    wire=wire_target(security or c["coord"], c[address], _id(node), c[stub]))


@pytest.mark.timeout(60)
def test_a_generation_over_the_wire_matches_one_process(chain, monkeypatch):
    link = _link(chain)
    hops = []
    before = ENDPOINTS.count
    received = []  # how stage 1 got its hidden states: (raw, chunks)
    runner = chain["s1"].servicer._runner
    real_step = runner.step

    def spy(a, rt, request, *args, **kwargs):
        received.append((bool(request.hidden_raw), len(request.hidden)))
        return real_step(a, rt, request, *args, **kwargs)

    monkeypatch.setattr(runner, "step", spy)

    def chain_step(entries):
        r = link.step(step_request(entries), timeout_s=30)
        # stage 0 reached stage 1 over its wire too: a wire connection there, no gRPC stream;
        # this process holds both ends of both links (what decides whether reads spin)
        hops.append((link.transport, chain["w1"].num_connections, chain["s1"].stream_guard.num_active,
                     ENDPOINTS.count - before))
        return list(r.token_ids)

    got = generate_local(chain_step, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=8), session_id="g")
    whole = StageRuntime(load_stage(chain["ckpt"], 0, 3), max_seq_len=64, max_sessions=1)
    assert got == generate_local(whole.run_and_sample, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=8))
    assert hops == [("wire", 1, 0, 4)] * 8 and link.num_opened == 1
    # chunks until stage 1 said (its StepWire answer, when stage 0's link connected) that it
    # reads raw hidden states, which a node older than them would not; raw bytes after that
    assert received[0] == (False, 1) and received[1:] == [(True, 0)] * 7
    link.close()
    deadline = time.monotonic() + 10  # the stages' threads see their connections end
    while ENDPOINTS.count != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ENDPOINTS.count == before


@pytest.mark.timeout(60)
def test_the_wire_checks_capability_and_caller_like_step_stream(chain):
    req = step_request([pb.ServeSessionEntry(session_id="x", start_position=0, num_tokens=1, token_ids=[1])])
    no_cap = _link(chain, metadata=())
    with pytest.raises(AuthError) as e:
        no_cap.step(req, timeout_s=30)
    assert not isinstance(e.value, PermissionDeniedError) and no_cap.transport == "wire"
    with pytest.raises(PermissionDeniedError, match="wrong"):
        _link(chain, metadata=step_metadata(CAP[:-1] + "x")).step(req, timeout_s=30)
    # a node that is not the previous stage may not send steps to stage 1, capability or not
    stranger = _link(chain, security=chain["pki"].node(_id("z")), node="b", stub="st1", address="a1")
    with pytest.raises(PermissionDeniedError, match="not the previous stage"):
        stranger.step(step_request([pb.ServeSessionEntry(session_id="x", start_position=0, num_tokens=1)], stage=1),
                      timeout_s=30)
    assert stranger.transport == "wire"


def _hello(sock, metadata):
    body = json.dumps({"metadata": metadata}).encode()
    sock.sendall(HEADER.pack(len(body), HELLO) + body)
    return read_frame(sock)


def _tls_to(port, security, node="a"):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    ctx = security.ssl_context(server=False) if security is not None else _no_cert_context()
    return ctx.wrap_socket(raw, server_hostname=f"{_id(node)}.node.swarm")


def _no_cert_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


@pytest.mark.timeout(60)
def test_malformed_and_unauthenticated_connections_are_refused_and_the_wire_keeps_serving(chain):
    port = chain["w0"].port
    # no client certificate: the handshake fails (or the server closes at once)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = _tls_to(port, None)
        s.sendall(HEADER.pack(2, HELLO) + b"{}")
        assert s.recv(1) == b""  # closed without a word
        raise ConnectionError("closed")
    # a certificate, but garbage where HELLO belongs; a huge frame; plain bytes
    for payload in (HEADER.pack(5, HELLO) + b"nope!", HEADER.pack(0xFFFFFFF0, HELLO), b"GET / HTTP/1.1\r\n\r\n"):
        s = _tls_to(port, chain["coord"])
        s.sendall(payload)
        frame = read_frame(s)
        assert frame is not None and frame[0] == ERROR and b"INVALID_ARGUMENT" in frame[1], frame
        s.close()
    # a good HELLO, then a STEP that is not a ServeStepRequest
    s = _tls_to(port, chain["coord"])
    s.sendall(HEADER.pack(len(b'{"metadata":[]}'), HELLO) + b'{"metadata":[]}' + struct.pack("<IB", 3, 2) + b"\xff\xff\xff")
    assert read_frame(s) == (READY, b"")
    frame = read_frame(s)
    assert frame is not None and frame[0] == ERROR and b"INVALID_ARGUMENT" in frame[1]
    s.close()
    # and an honest link still gets its tokens
    r = _link(chain).step(step_request([pb.ServeSessionEntry(session_id="h", start_position=0, num_tokens=2,
                                                             token_ids=[1, 2])]), timeout_s=30)
    assert len(r.token_ids) == 1


@pytest.mark.timeout(60)
def test_an_unreachable_wire_falls_back_to_grpc(chain):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    target = WireTarget(address=chain["a0"], node_id=_id("a"), security=chain["coord"],
                        ask=lambda: pb.ServeStepWireReply(port=dead_port))
    link = StepLink(chain["st0"].StepStream, metadata=step_metadata(CAP), what="stage 0", wire=target)
    r = link.step(step_request([pb.ServeSessionEntry(session_id="f", start_position=0, num_tokens=2,
                                                     token_ids=[1, 2])]), timeout_s=30)
    assert len(r.token_ids) == 1 and link.transport == "grpc"
    link.close()
    # the node's StepWire call tells its real port
    assert chain["st0"].StepWire(pb.ServeStepWireRequest(), timeout=5).port == chain["w0"].port


@pytest.mark.timeout(60)
def test_a_caller_over_its_connection_limit_sends_that_step_over_grpc(chain, monkeypatch):
    import swarm.transport.step_wire as step_wire

    monkeypatch.setattr(step_wire, "MAX_PER_CALLER", 1)
    entry = lambda sid: step_request([pb.ServeSessionEntry(session_id=sid, start_position=0, num_tokens=2,  # noqa: E731
                                                           token_ids=[1, 2])])
    first, second = _link(chain), _link(chain)
    assert len(first.step(entry("p"), timeout_s=30).token_ids) == 1 and first.transport == "wire"
    r = second.step(entry("q"), timeout_s=30)  # its wire's HELLO refused: gRPC
    assert len(r.token_ids) == 1 and second.transport == "grpc"
    decode = step_request([pb.ServeSessionEntry(session_id="q", start_position=2, num_tokens=1, token_ids=[3])])
    assert len(second.step(decode, timeout_s=30).token_ids) == 1 and second.transport == "grpc"  # gRPC for a while
    first.close()
    second.close()


@pytest.mark.timeout(60)
def test_stopping_the_wire_closes_its_open_connections(chain):
    s = _tls_to(chain["w0"].port, chain["coord"])
    assert _hello(s, []) == (READY, b"")
    assert chain["w0"].num_connections == 1
    chain["w0"].stop()
    s.settimeout(10)
    assert read_frame(s) is None  # closed by the node, not left open on a thread of its own
    s.close()


@pytest.mark.timeout(30)
def test_a_frame_header_claiming_megabytes_reserves_only_what_arrives():
    import tracemalloc

    a, b = socket.socketpair()
    a.sendall(HEADER.pack(60 << 20, STEP) + b"x" * 10)  # claims 60 MiB (under the limit), sends 10 bytes
    a.close()
    tracemalloc.start()
    try:
        with pytest.raises(ConnectionError, match="10 of"):
            read_frame(b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        b.close()
    assert peak < 4 << 20, peak
