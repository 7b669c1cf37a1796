"""Steps on persistent StepStream links: one stream per link for a whole generation, the same
tokens as one process, the same authorization and error statuses as unary Step, a new stream
after a failed step, and a stalled stage cancelled at the step's deadline."""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest

from node.inference.servicer import InferenceStageServicer
from swarm.inference.commit_sig import authentic_stages, derive_commit_key
from swarm.errors import AuthError, InvalidRequestError, PeerError, PermissionDeniedError
from swarm.inference.local import generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, data_channel, make_server
from swarm.transport.inference import new_step_capability, step_metadata
from swarm.transport.step_link import StepLink
from swarm.transport.tls import TlsSecurity
from tests.helpers.tls import TestPki
from swarm.transport.inference_shards import serve_shard

CAP = new_step_capability()


def _id(name: str) -> str:
    return hashlib.md5(name.encode()).hexdigest()  # a node id: 32 hex characters


def start_stage_server(pki: TestPki, tmp_path, name, ckpt_dir, confirm=lambda a: (CAP, b"")):
    sec = pki.node(_id(name))
    servicer = InferenceStageServicer(security=sec, node_id=_id(name), device="cpu", state_dir=tmp_path / name,
                                      open_coordinator_shard=lambda req: serve_shard(ckpt_dir, req),
                                      confirm=confirm, identify=TlsSecurity.peer_identity)
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=6)
    pb_grpc.add_InferenceStageServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0, security=sec)
    server.start()
    server.servicer = servicer  # for tests that start its step wire (test_step_wire.py)
    return server, f"127.0.0.1:{port}"


def assignment(stage, n, first, last, next_address="", next_node="", prev_node=""):
    return pb.ServeStageAssignment(
        model_name="m", model_digest="d" * 64, replica=0, stage=stage, num_stages=n, first_layer=first,
        last_layer_excl=last, next_address=next_address, next_node_id=next_node, prev_node_id=prev_node,
        max_seq_len=64, max_sessions=2, shard_sources=["coordinator"], session_timeout_s=60, hidden_codec="none")


def step_request(entries, stage=0):
    msgs = [pb.ServeSessionEntry(session_id=e.session_id, start_position=e.start_position, num_tokens=e.num_tokens,
                                 token_ids=list(e.token_ids), reset=e.reset) for e in entries]
    return pb.ServeStepRequest(model_name="m", replica=0, stage=stage, entries=msgs)


def test_a_generation_uses_one_stream_per_link_and_matches_one_process(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    pki = TestPki(tmp_path / "ca")
    s1, a1 = start_stage_server(pki, tmp_path, "b", d)
    s0, a0 = start_stage_server(pki, tmp_path, "a", d)
    coord = pki.coordinator()
    try:
        with data_channel(a0, security=coord, node_id=_id("a")) as c0, \
                data_channel(a1, security=coord, node_id=_id("b")) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3, prev_node=_id("a"))), timeout=30)
            st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1, next_node=_id("b"))),
                          timeout=30)
            link = StepLink(st0.StepStream, metadata=step_metadata(CAP), what="stage 0")
            active_on_last = []

            def chain_step(entries):
                r = link.step(step_request(entries), timeout_s=30)
                active_on_last.append(s1.stream_guard.num_active)  # streams stage 1 is serving now
                return list(r.token_ids)

            got = generate_local(chain_step, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=8), session_id="g")
            whole = StageRuntime(load_stage(d, 0, 3), max_seq_len=64, max_sessions=1)
            assert got == generate_local(whole.run_and_sample, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=8))
            # one stream coordinator -> stage 0 and one stage 0 -> stage 1 carried all 8 steps
            assert link.num_opened == 1 and active_on_last == [1] * 8

            # a bad step fails with the status a unary Step gives; the next step opens a new stream
            with pytest.raises(InvalidRequestError, match="replay"):
                link.step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[
                    pb.ServeSessionEntry(session_id="g", start_position=99, num_tokens=1, token_ids=[1])]), timeout_s=30)
            r = link.step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[
                pb.ServeSessionEntry(session_id="h", start_position=0, num_tokens=2, token_ids=[1, 2])]), timeout_s=30)
            assert len(r.token_ids) == 1 and link.num_opened == 2
            link.close()

            # the same authorization as unary Step, on every stream
            req = pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[
                pb.ServeSessionEntry(session_id="x", start_position=0, num_tokens=1, token_ids=[1])])
            with pytest.raises(AuthError) as e:
                StepLink(st0.StepStream, metadata=(), what="stage 0").step(req, timeout_s=30)
            assert not isinstance(e.value, PermissionDeniedError)  # no capability: UNAUTHENTICATED
            with pytest.raises(PermissionDeniedError, match="wrong"):
                StepLink(st0.StepStream, metadata=step_metadata(CAP[:-1] + "x"), what="stage 0").step(req, timeout_s=30)
        # a node that is not the previous stage may not stream steps to stage 1, capability or not
        with data_channel(a1, security=pki.node(_id("z")), node_id=_id("b")) as cz:
            stranger = StepLink(pb_grpc.InferenceStageStub(cz).StepStream, metadata=step_metadata(CAP), what="stage 1")
            with pytest.raises(PermissionDeniedError, match="not the previous stage"):
                stranger.step(pb.ServeStepRequest(model_name="m", replica=0, stage=1, entries=[
                    pb.ServeSessionEntry(session_id="x", start_position=0, num_tokens=1)]), timeout_s=30)
    finally:
        s0.stop(0)
        s1.stop(0)


class _StalledStream:
    """A stream whose stage never answers: blocks until cancelled, then fails as gRPC does."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def done(self) -> bool:
        return self.cancelled.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __next__(self):
        assert self.cancelled.wait(timeout=30), "the watchdog never cancelled the stalled step"
        raise _Cancelled()


class _Cancelled(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.CANCELLED

    def details(self):
        return "Locally cancelled by application!"


def test_a_step_past_its_deadline_cancels_the_stream_and_the_next_step_reopens():
    opened: list[_StalledStream] = []

    def open_stream(requests, metadata):
        opened.append(_StalledStream())
        return opened[-1]

    link = StepLink(open_stream, metadata=(), what="stage 0 at test")
    with pytest.raises(PeerError, match="did not answer a step within"):
        link.step(pb.ServeStepRequest(), timeout_s=0.01)
    assert len(opened) == 1 and opened[0].cancelled.is_set()
    with pytest.raises(PeerError):
        link.step(pb.ServeStepRequest(), timeout_s=0.01)
    assert len(opened) == 2  # a new stream for the next step


def test_stages_given_commit_keys_authenticate_their_commitments_with_them(tmp_path):
    """The coordinator's ConfirmAssignment hands each stage its commit key: the stages MAC their
    commitments with it (no Ed25519 signature per step), and the coordinator, deriving the same
    keys, vouches for them; a key the stage was not given does not."""
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    pki = TestPki(tmp_path / "ca")
    secret = b"k" * 32

    def key(node: str, stage: int) -> bytes:
        return derive_commit_key(secret, node_id=node, model="m", stage=stage)

    def confirm(name):
        return lambda a: (CAP, key(_id(name), a.stage))

    s1, a1 = start_stage_server(pki, tmp_path, "b", d, confirm("b"))
    s0, a0 = start_stage_server(pki, tmp_path, "a", d, confirm("a"))
    try:
        with data_channel(a0, security=pki.coordinator(), node_id=_id("a")) as c0, \
                data_channel(a1, security=pki.coordinator(), node_id=_id("b")) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3, prev_node=_id("a"))), timeout=30)
            st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1, next_node=_id("b"))),
                          timeout=30)
            link = StepLink(st0.StepStream, metadata=step_metadata(CAP), what="stage 0")
            req = pb.ServeStepRequest(model_name="m", replica=0, stage=0, step_nonce=b"n" * 12, commit_session_ids=["g"],
                                      entries=[pb.ServeSessionEntry(session_id="g", start_position=0, num_tokens=3,
                                                                    token_ids=[3, 1, 4])])
            reply = link.step(req, timeout_s=30)
            link.close()
        assert sorted(sg.stage for sg in reply.signatures) == [0, 1]
        assert all(len(sg.mac) == 32 and not sg.signature for sg in reply.signatures)
        nodes = [_id("a"), _id("b")]
        no_key = {n: b"" for n in nodes}.__getitem__
        assert authentic_stages(reply, model="m", nonce=b"n" * 12, node_ids=nodes, public_key=no_key,
                                commit_key=lambda n, k: key(n, k)) == [True, True]
        other = b"o" * 32
        assert authentic_stages(reply, model="m", nonce=b"n" * 12, node_ids=nodes, public_key=no_key,
                                commit_key=lambda n, k: derive_commit_key(other, node_id=n, model="m", stage=k)) \
            == [False, False]
    finally:
        s0.stop(0)
        s1.stop(0)
