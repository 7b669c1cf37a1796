"""In-process gRPC: stage calls need the chain's step capability the coordinator issued."""

from __future__ import annotations

import grpc
import pytest

from node.inference.servicer import InferenceStageServicer
from swarm.inference.local import generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, data_channel, make_server
from swarm.transport.inference import STEP_CAPABILITY_KEY, new_step_capability, step_metadata
from tests.helpers.tls import TestPki
from swarm.transport.inference_shards import serve_shard

CAP = new_step_capability()


def _pki(tmp_path) -> TestPki:
    return TestPki(tmp_path / "ca")  # the same CA for every call with this tmp_path


def _node_sec(tmp_path, name):
    import hashlib

    return _pki(tmp_path).node(hashlib.md5(name.encode()).hexdigest())  # TLS as node "<name>"


def _coord(tmp_path):
    return _pki(tmp_path).coordinator()  # the test calls stages as the coordinator would


def start_stage_server(tmp_path, name, ckpt_dir, confirm):
    sec = _node_sec(tmp_path, name)
    servicer = InferenceStageServicer(security=sec, node_id=name * 8, device="cpu", state_dir=tmp_path / name,
                                      open_coordinator_shard=lambda req: serve_shard(ckpt_dir, req), confirm=confirm)
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    pb_grpc.add_InferenceStageServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0, security=sec)
    server.start()
    return server, f"127.0.0.1:{port}"


def assignment(stage, n, first, last, next_address=""):
    return pb.ServeStageAssignment(
        model_name="m", model_digest="d" * 64, replica=0, stage=stage, num_stages=n, first_layer=first,
        last_layer_excl=last, next_address=next_address, max_seq_len=64, max_sessions=2,
        shard_sources=["coordinator"], session_timeout_s=60, hidden_codec="none")


def entry(sid, start, toks):
    return pb.ServeSessionEntry(session_id=sid, start_position=start, num_tokens=len(toks), token_ids=toks)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_steps_need_the_chain_capability(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    issued = []  # what the fake coordinator confirmed

    def confirm(a):
        issued.append(a.stage)
        return CAP, b""

    s1, a1 = start_stage_server(tmp_path, "b", d, confirm)
    s0, a0 = start_stage_server(tmp_path, "a", d, confirm)
    try:
        with data_channel(a0, security=_coord(tmp_path)) as c0, data_channel(a1, security=_coord(tmp_path)) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3)), timeout=30)
            st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1)), timeout=30)
            assert sorted(issued) == [0, 1]
            req = pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=[entry("s", 0, [3, 1, 4])])

            code, details = code_of(lambda: st0.Step(req, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and STEP_CAPABILITY_KEY in details
            code, details = code_of(lambda: st0.Step(req, timeout=10, metadata=step_metadata(CAP[:-1] + "x")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "wrong" in details
            code, _ = code_of(lambda: st0.Step(req, timeout=10, metadata=step_metadata("y" * 200)))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            # the last stage refuses a caller that skips the first stage without the capability
            req1 = pb.ServeStepRequest(model_name="m", replica=0, stage=1, entries=[entry("s", 0, [3])])
            assert code_of(lambda: st1.Step(req1, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
            # closing sessions and unloading stages are stage calls too
            close = pb.ServeCloseSessionRequest(model_name="m", replica=0, session_ids=["s"])
            assert code_of(lambda: st0.CloseSession(close, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
            unload = pb.ServeUnloadStageRequest(model_name="m", replica=0)
            assert code_of(lambda: st1.UnloadStage(unload, timeout=10,
                                                   metadata=step_metadata("nope")))[0] == grpc.StatusCode.PERMISSION_DENIED

            # with the capability the chain generates (stage 0 forwards it to stage 1) as one process does
            def chain_step(entries):
                msgs = [pb.ServeSessionEntry(session_id=e.session_id, start_position=e.start_position,
                                             num_tokens=e.num_tokens, token_ids=list(e.token_ids)) for e in entries]
                r = st0.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=msgs), timeout=30,
                             metadata=step_metadata(CAP))
                return list(r.token_ids)

            got = generate_local(chain_step, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=6), session_id="g")
            whole = StageRuntime(load_stage(d, 0, 3), max_seq_len=64, max_sessions=1)
            assert got == generate_local(whole.run_and_sample, [3, 1, 4, 1, 5], SamplingParams(max_new_tokens=6))
            closed = st0.CloseSession(pb.ServeCloseSessionRequest(model_name="m", replica=0, session_ids=["g"]),
                                      timeout=10, metadata=step_metadata(CAP))
            assert closed.num_closed == 1
            assert st1.UnloadStage(unload, timeout=10, metadata=step_metadata(CAP)).unloaded
    finally:
        s0.stop(0)
        s1.stop(0)


def test_an_assignment_the_coordinator_did_not_issue_is_refused(tmp_path):
    d = tmp_path / "ckpt"
    make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    server, addr = start_stage_server(tmp_path, "a", d, confirm=lambda a: None)
    try:
        with data_channel(addr, security=_coord(tmp_path)) as ch:
            code, details = code_of(lambda: pb_grpc.InferenceStageStub(ch).LoadStage(
                pb.ServeLoadStageRequest(assignment=assignment(0, 1, 0, 3)), timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "did not issue" in details
    finally:
        server.stop(0)
