"""Disaggregated serving's KV hand-off without a network: a session prefilled on one stage
runtime and moved (export -> the wire format -> import) decodes on another exactly as if it had
stayed; the receiving side refuses every field that is not what its assignment expects."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import InvalidRequestError, PermissionDeniedError
from swarm.inference.local import LocalChain, generate_local
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport.kv import kv_to_chunks

from coordinator.inference.store import ServeParams
from node.inference.kv_handoff import import_kv


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_tiny_checkpoint(path, "llama", num_layers=4, hidden_size=32, num_heads=4, seed=2)


def rt(path, first, last, n=4, **kw) -> StageRuntime:
    return StageRuntime(load_stage(path, first, last, is_first=first == 0, is_last=last == n),
                        max_seq_len=kw.pop("max_seq_len", 64), max_sessions=4)


def assignment(stage: int, *, replica: int = 1, sources=("p0",)) -> pb.ServeStageAssignment:
    return pb.ServeStageAssignment(model_name="m", replica=replica, stage=stage, num_stages=2,
                                   kv_source_node_ids=list(sources))


def move(src: StageRuntime, dst: StageRuntime, sid: str, *, stage: int, caller: str = "p0", sender: str = "p0",
         replica: int = 1, a=None, kv=None) -> int:
    kv = src.export_kv(sid)[0] if kv is None else kv
    chunks = list(kv_to_chunks(kv, session_id=sid, model_name="m", stage=stage, replica=replica, sender_id=sender,
                               nonce=b"n" * 16))
    return import_kv(dst, a or assignment(stage), chunks[0], iter(chunks[1:]), caller=caller).kv_bytes


def test_prefill_here_decode_there_equals_one_process(ckpt):
    path, cfg = ckpt
    prompts = {"a": [5, 17, 42, 7, 99, 3], "b": [8, 1, 2, 9, 4, 6]}  # equal length: prefilled as one batch
    params = SamplingParams(max_new_tokens=10)
    whole = rt(path, 0, 4)
    want = {s: generate_local(whole.run_and_sample, p, params, session_id=s) for s, p in prompts.items()}
    pre, dec = [rt(path, 0, 2), rt(path, 2, 4)], [rt(path, 0, 2), rt(path, 2, 4)]
    entries = [StepEntry(session_id=s, start_position=0, num_tokens=len(p), token_ids=tuple(p), sampling=params)
               for s, p in prompts.items()]
    first = pre[1].sample(entries, pre[1].run(entries, pre[0].run(entries)))  # the prefill chain's step
    moved = 0
    for k in range(2):
        for sid in prompts:
            moved += move(pre[k], dec[k], sid, stage=k)
        pre[k].close(list(prompts))
    assert moved == 2 * 6 * 4 * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # sessions x positions x layers x K,V
    chain = LocalChain(dec)
    for (sid, p), tok in zip(prompts.items(), first):
        out = [tok]
        while len(out) < params.max_new_tokens:
            e = StepEntry(session_id=sid, start_position=len(p) + len(out) - 1, num_tokens=1, token_ids=(out[-1],),
                          sampling=params)
            out.append(chain.step([e])[0])
        assert out == want[sid]


def test_only_the_assigned_prefill_node_may_send(ckpt):
    path, _ = ckpt
    src, dst = rt(path, 0, 2), rt(path, 0, 2)
    src.run([StepEntry(session_id="s", start_position=0, num_tokens=3, token_ids=(1, 2, 3))])
    with pytest.raises(PermissionDeniedError, match="may not send KV"):
        move(src, dst, "s", stage=0, caller="stranger", sender="stranger")
    with pytest.raises(InvalidRequestError, match="sender"):  # an allowed caller naming someone else
        move(src, dst, "s", stage=0, caller="p0", sender="p9")
    with pytest.raises(PermissionDeniedError):
        move(src, dst, "s", stage=0, a=assignment(0, sources=()))  # not a decode stage: nobody may
    assert dst.num_sessions == 0
    assert move(src, dst, "s", stage=0) > 0 and dst.session_length("s") == 3


@pytest.mark.parametrize("bad", ["stage", "replica", "dtype", "layers", "positions", "nan"])
def test_a_kv_cache_that_does_not_fit_is_refused(ckpt, bad):
    path, _ = ckpt
    src, dst = rt(path, 0, 2), rt(path, 0, 2, max_seq_len=8)
    src.run([StepEntry(session_id="s", start_position=0, num_tokens=3, token_ids=(1, 2, 3))])
    kv = src.export_kv("s")[0]
    kw = {}
    if bad == "stage":
        kw["a"] = assignment(1)
    elif bad == "replica":
        kw["replica"] = 7
    elif bad == "dtype":
        kw["kv"] = kv.to(torch.float16)
    elif bad == "layers":
        kw["kv"] = kv[:1]
    elif bad == "positions":
        kw["kv"] = torch.zeros(kv.shape[:3] + (8,) + kv.shape[4:])  # no room left for a token
    elif bad == "nan":
        kv = kv.clone()
        kv[0, 0, 0, 0, 0] = float("nan")
        kw["kv"] = kv
    with pytest.raises(InvalidRequestError):
        move(src, dst, "s", stage=0, **kw)
    assert dst.num_sessions == 0


def test_corrupted_payload_is_refused(ckpt):
    path, _ = ckpt
    src, dst = rt(path, 0, 2), rt(path, 0, 2)
    src.run([StepEntry(session_id="s", start_position=0, num_tokens=3, token_ids=(1, 2, 3))])
    chunks = list(kv_to_chunks(src.export_kv("s")[0], session_id="s", model_name="m", stage=0, replica=1,
                               sender_id="p0", nonce=b"n" * 16))
    chunks[0].tensor.data = b"\x00" + chunks[0].tensor.data[1:]
    with pytest.raises(InvalidRequestError, match="checksum"):
        import_kv(dst, assignment(0), chunks[0], iter(chunks[1:]), caller="p0")


def test_unsupported_combinations_are_refused_with_what_to_do():
    with pytest.raises(InvalidRequestError, match="drop one of them"):
        ServeParams(num_replicas=2, disaggregate="on", routes=True, verify_prob=0)
    assert ServeParams(num_replicas=2, disaggregate="on", verify_prob=0.05).verify_prob == 0.05  # checks ride along
    with pytest.raises(InvalidRequestError, match="--replicas 2"):
        ServeParams(num_replicas=1, disaggregate="on", verify_prob=0)
    assert ServeParams(num_replicas=2, disaggregate="on", verify_prob=0).disaggregate == "on"
