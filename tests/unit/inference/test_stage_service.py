"""In-process gRPC: the node's stage service loads only its layers, chains, refuses bad input."""

from __future__ import annotations

import grpc
import pytest
import torch

from node.traffic import Traffic
from node.inference.servicer import InferenceStageServicer
from swarm.inference.codec import int8_decode, int8_encode
from swarm.inference.local import generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.proto.v1 import inference_pb2_grpc as pb_grpc
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, data_channel, make_server
from swarm.transport.inference import hidden_to_chunks
from tests.helpers.tls import TestPki
from swarm.transport.inference_shards import receive_shard, serve_shard


@pytest.fixture()
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(d, "gpt2", num_layers=3, hidden_size=32, num_heads=4)
    return d, cfg


def _pki(tmp_path) -> TestPki:
    return TestPki(tmp_path / "ca")  # the same CA for every call with this tmp_path


def _node_sec(tmp_path, name):
    import hashlib

    return _pki(tmp_path).node(hashlib.md5(name.encode()).hexdigest())  # TLS as node "<name>"


def _coord(tmp_path):
    return _pki(tmp_path).coordinator()  # the test calls stages as the coordinator would


def start_stage_server(tmp_path, name, ckpt_dir):
    sec = _node_sec(tmp_path, name)
    servicer = InferenceStageServicer(security=sec, node_id=name * 8, device="cpu", state_dir=tmp_path / name,
                                      open_coordinator_shard=lambda req: serve_shard(ckpt_dir, req),
                                      traffic=Traffic())
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=4)
    pb_grpc.add_InferenceStageServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0, security=sec)
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


def assignment(stage, n, first, last, next_address="", sources=("coordinator",), codec="none"):
    return pb.ServeStageAssignment(
        model_name="m", model_digest="d" * 64, replica=0, stage=stage, num_stages=n, first_layer=first,
        last_layer_excl=last, next_address=next_address, max_seq_len=64, max_sessions=2, shard_sources=list(sources),
        session_timeout_s=60, hidden_codec=codec)


def step(stub, entries, **kw):
    return stub.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=0, entries=entries, **kw), timeout=30)


def entry(sid, start, toks, reset=False):
    return pb.ServeSessionEntry(session_id=sid, start_position=start, num_tokens=len(toks), token_ids=toks, reset=reset)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_two_stage_chain_over_grpc(tmp_path, ckpt, codec):
    d, cfg = ckpt
    s1, sv1, a1 = start_stage_server(tmp_path, "b", d)
    s0, sv0, a0 = start_stage_server(tmp_path, "a", d)
    try:
        with data_channel(a0, security=_coord(tmp_path)) as c0, data_channel(a1, security=_coord(tmp_path)) as c1:
            st0, st1 = pb_grpc.InferenceStageStub(c0), pb_grpc.InferenceStageStub(c1)
            st1.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3)), timeout=30)
            r = st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, a1, codec=codec)), timeout=30)
            assert r.loaded_bytes > 0
            # the first stage's shard holds layers 0-1 and the embeddings only
            from safetensors import safe_open
            shard = next((tmp_path / "a" / "inference" / "m").iterdir()) / "model.safetensors"
            with safe_open(str(shard), "pt") as f:
                names = set(f.keys())
            assert not any(".h.2." in n for n in names) and "transformer.wte.weight" in names
            prompt = [3, 1, 4, 1, 5]

            def chain_step(entries):
                msgs = [entry(e.session_id, e.start_position, list(e.token_ids), e.reset) for e in entries]
                return list(step(st0, msgs).token_ids)

            got = generate_local(chain_step, prompt, SamplingParams(max_new_tokens=10), session_id="s")
            whole = StageRuntime(load_stage(d, 0, 3), max_seq_len=64, max_sessions=1)
            want = generate_local(whole.run_and_sample, prompt, SamplingParams(max_new_tokens=10))
            if codec == "none":
                assert got == want
            else:
                assert len(got) == 10  # 8-bit hidden states: close, not bit-identical
            # peer traffic: what stage 0 sent (hidden states) stage 1 received, and back (tokens)
            t0, t1 = sv0.traffic.totals(), sv1.traffic.totals()
            assert t0["bytes_sent"] > 10 * 4 * cfg.hidden_size // (4 if codec == "int8" else 1)
            assert (t0["bytes_sent"], t0["bytes_received"]) == (t1["bytes_received"], t1["bytes_sent"])

            # bad requests: INVALID_ARGUMENT / NOT_FOUND, and the server keeps serving
            with pytest.raises(grpc.RpcError) as e:
                step(st0, [entry("s", 99, [1])])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                step(st0, [entry("x", 0, [10**7])])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as e:
                st0.Step(pb.ServeStepRequest(model_name="other", replica=0, stage=0, entries=[entry("s", 0, [1])]), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            bad_hidden = hidden_to_chunks(torch.zeros(2, cfg.hidden_size), codec="none", label="m/0", boundary=0,
                                          replica=0, sender_id="x")
            with pytest.raises(grpc.RpcError) as e:
                st1.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=1, entries=[entry("y", 0, [])],
                                             hidden=bad_hidden), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            nan = hidden_to_chunks(torch.full((1, cfg.hidden_size), float("nan")), codec="none", label="m/0",
                                   boundary=0, replica=0, sender_id="x")
            with pytest.raises(grpc.RpcError) as e:
                st1.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=1,
                                             entries=[pb.ServeSessionEntry(session_id="y", num_tokens=1)], hidden=nan), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # the raw hot-path form: wrong size, NaN, an unknown dtype, both forms at once
            one = [pb.ServeSessionEntry(session_id="y", num_tokens=1)]
            row = torch.zeros(1, cfg.hidden_size)
            for raw, dtype, extra, says in ((row.numpy().tobytes()[:-4], "float32", {}, "needs"),
                                            (torch.full_like(row, float("nan")).numpy().tobytes(), "float32", {}, "NaN"),
                                            (row.numpy().tobytes(), "int64", {}, "unsupported"),
                                            (row.numpy().tobytes(), "float32", {"hidden": nan}, "not both")):
                with pytest.raises(grpc.RpcError) as e:
                    st1.Step(pb.ServeStepRequest(model_name="m", replica=0, stage=1, entries=one, hidden_raw=raw,
                                                 hidden_dtype=dtype, **extra), timeout=5)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                st0.LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 2, 0, 2, "")), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert st0.CloseSession(pb.ServeCloseSessionRequest(model_name="m", replica=0, session_ids=["s"]), timeout=5).num_closed == 1

            # a third node loads the last stage from the peer that holds it, not the coordinator
            s2, sv2, a2 = start_stage_server(tmp_path, "c", tmp_path / "nowhere")
            try:
                with data_channel(a2, security=_coord(tmp_path)) as c2:
                    pb_grpc.InferenceStageStub(c2).LoadStage(
                        pb.ServeLoadStageRequest(assignment=assignment(1, 2, 2, 3, sources=(a1,))), timeout=30)
                # the shard crossed from peer to peer: counted on both sides
                shard_bytes = sv2.traffic.totals()["bytes_received"]
                assert shard_bytes > 0 and sv1.traffic.totals()["bytes_sent"] - t1["bytes_sent"] >= shard_bytes
            finally:
                s2.stop(0)
    finally:
        s0.stop(0)
        s1.stop(0)


def test_int8_codec_roundtrip_and_validation():
    x = torch.randn(5, 16)
    payload, meta = int8_encode(x)
    y = int8_decode(payload, meta, (5, 16))
    assert torch.allclose(x, y, atol=x.abs().max().item() / 100)
    with pytest.raises(Exception):
        int8_decode(payload[:-1], meta, (5, 16))


def test_receive_shard_rejects_tampering(tmp_path, ckpt):
    d, _ = ckpt
    req = pb.ServeFetchShardRequest(model_name="m", first_layer=0, last_layer_excl=1, include_embeddings=True)
    msgs = list(serve_shard(d, req))
    assert receive_shard(iter(msgs), tmp_path / "ok") > 0
    bad = [pb.ServeShardChunk() for _ in range(0)] + msgs[:1] + [pb.ServeShardChunk(data=b"xx")]
    with pytest.raises(Exception, match="before any tensor"):
        receive_shard(iter(bad), tmp_path / "bad")
    t = pb.ServeShardChunk()
    t.CopyFrom(msgs[1])
    t.tensor_crc32 ^= 1
    with pytest.raises(Exception, match="checksum"):
        receive_shard(iter([msgs[0], t] + msgs[2:]), tmp_path / "bad2")
    t2 = pb.ServeShardChunk()
    t2.CopyFrom(msgs[1])
    t2.tensor_bytes += 4
    with pytest.raises(Exception, match="shape"):
        receive_shard(iter([msgs[0], t2]), tmp_path / "bad3")


def test_assignment_not_confirmed_by_the_coordinator_is_refused(tmp_path, ckpt):
    d, _ = ckpt
    seen = []
    sec = _node_sec(tmp_path, "n")
    servicer = InferenceStageServicer(security=sec, node_id="n" * 16, device="cpu", state_dir=tmp_path / "n",
                                      open_coordinator_shard=lambda req: serve_shard(d, req),
                                      confirm=lambda a: seen.append(a.stage) or None)
    server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, max_workers=2)
    pb_grpc.add_InferenceStageServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0, security=sec)
    server.start()
    try:
        with data_channel(f"127.0.0.1:{port}", security=_coord(tmp_path)) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.InferenceStageStub(ch).LoadStage(pb.ServeLoadStageRequest(assignment=assignment(0, 1, 0, 3)), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and seen == [0]
        assert not (tmp_path / "n" / "inference").exists()  # nothing fetched
    finally:
        server.stop(0)
