"""Spot checks through compressed boundaries (swarm/compression/replay.py, node/training/spotcheck.py):
what a witness sends is exactly what the checked stage's neighbour computed on, an honest stage
passes the checker's comparison whatever the codec's rounding, and a corrupting one does not.
Seeded; no network."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from node.training.spotcheck import TOLERANCE, CheckRole, StageVerifier, VerifyPlan, recompute, rel_error
from swarm.compression import BoundaryCodec, CodecMessage, CodecSpec, RamStore
from swarm.compression import replay
from swarm.errors import InvalidRequestError
from swarm.faults import NO_FAULTS, FaultConfig, FaultInjector
from swarm.model import ModelConfig, build_stage
from swarm.model.stage import StageModel
from swarm.transport import tensors as wt

pytestmark = pytest.mark.timeout(60)

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4,
                  intermediate_size=64, max_position_embeddings=16, tie_word_embeddings=False)
B, S, H, N = 2, 8, 32, 6  # micro-batch, sequence, hidden, samples in the data set
CODECS = ["aqsgd:fw=2,bw=4", "aqsgd:fw=4,bw=8", "aqsgd:fw=4,bw=8,first=4,fwround=sr", "direct:fw=8,bw=8",
          "direct:fw=4,bw=4,bwround=rtn", "none"]


def _pair(text: str) -> tuple[BoundaryCodec, BoundaryCodec]:
    spec = CodecSpec.parse(text)
    store = (lambda: RamStore(key="k", num_samples=N, row_shape=(S, H))) if spec.kind == "aqsgd" else (lambda: None)
    return (BoundaryCodec(spec, key="k", store=store(), seed=3), BoundaryCodec(spec, key="k", store=store(), seed=3))


def _stage() -> StageModel:
    full = build_stage(CFG, 0, 3, seed=0)
    s = StageModel(CFG, 1, 2, is_first=False, is_last=False)
    s.load_hf_state(full.hf_state_dict())
    return s


def _near_copy(model: StageModel) -> StageModel:
    """A replica after a successful averaging round: its weights ~1e-4 apart (fp16 deltas)."""
    other = _stage()
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-4 * p.abs().mean())
    return other


@pytest.mark.parametrize("text", CODECS)
def test_a_senders_view_of_what_its_receiver_decodes_is_exact(text):
    up, down = _pair(text)
    g = torch.Generator().manual_seed(1)
    for step in range(4):  # samples come back: AQ-SGD sends changes from the second visit on
        ids = torch.tensor([(2 * step) % N, (2 * step + 1) % N])
        a = torch.randn(B, S, H, generator=g)
        msg = up.encode_forward(a, ids)
        got = down.decode_forward(CodecMessage.from_bytes(msg.to_bytes()), ids, dtype=torch.float32)
        assert torch.equal(replay.sent_forward(up, msg, ids), got)
        gmsg = down.encode_backward(torch.randn(B, S, H, generator=g), ids)
        assert torch.equal(replay.sent_backward(down, gmsg),
                           up.decode_backward(CodecMessage.from_bytes(gmsg.to_bytes()), ids, dtype=torch.float32))


@pytest.mark.parametrize("text", CODECS)
def test_an_honest_stage_passes_and_a_corrupting_one_fails_through_the_codec(text):
    """The checker recomputes from what the checked stage received (as its previous stage holds
    it), replays an honest sender against the next stage's m(x) from just before decoding, and
    allows twice that rounding error on top of the lossless tolerance."""
    spec = CodecSpec.parse(text)
    target = _stage()
    checker = _near_copy(target)
    into, _ = _pair(text)  # the boundary into the target (its previous stage's side)
    out_up, out_down = _pair(text)  # the target's output boundary (target side, next stage's side)
    into_down = _pair(text)[1]
    faults = FaultInjector(FaultConfig.parse("corrupt-activations=1.0"))
    g = torch.Generator().manual_seed(2)
    worst = {"output": 0.0, "grad_in": 0.0}
    for step in range(6):
        ids = torch.tensor([(2 * step) % N, (2 * step + 1) % N])
        x_msg = into.encode_forward(torch.randn(B, S, H, generator=g), ids)
        x = into_down.decode_forward(CodecMessage.from_bytes(x_msg.to_bytes()), ids, dtype=torch.float32)
        assert torch.equal(replay.sent_forward(into, x_msg, ids), x)  # the witness' copy of the input
        xin = x.clone().requires_grad_(True)
        y = target(xin)
        store = out_down.store  # the next stage's m(x) just before it decodes (what received_ref keeps)
        ref = None if store is None else torch.cat([store.read(ids, "cpu").float().reshape(B, -1),
                                                    store.seen(ids).float().reshape(-1, 1)], dim=1)
        msg = out_up.encode_forward(y.detach(), ids)
        y_dec = out_down.decode_forward(CodecMessage.from_bytes(msg.to_bytes()), ids, dtype=torch.float32)
        g_out_msg = out_down.encode_backward(torch.randn(B, S, H, generator=g), ids)
        g_out = replay.sent_backward(out_down, g_out_msg)
        (gin,) = torch.autograd.grad(y, [xin], grad_outputs=g_out)
        gin_dec = replay.sent_backward(into_down, into_down.encode_backward(gin, ids))

        mine_y, mine_g = recompute(checker, x=x, is_first=False, is_last=False, labels=None, grad_out=g_out,
                                   loss_scale=1.0)
        ref_rows = None if ref is None else (ref[:, :-1].reshape(B, S, H), ref[:, -1] > 0.5)
        honest = replay.honest_forward(spec, mine_y, reference=None if ref is None else ref_rows[0],
                                       seen=None if ref is None else ref_rows[1])
        tol_y = TOLERANCE["output"] + 2 * rel_error(honest, mine_y)
        tol_g = TOLERANCE["grad_in"] + 2 * rel_error(replay.honest_backward(spec, mine_g), mine_g)
        assert rel_error(y_dec, mine_y) <= tol_y, (step, rel_error(y_dec, mine_y), tol_y)
        assert rel_error(gin_dec, mine_g) <= tol_g, (step, rel_error(gin_dec, mine_g), tol_g)
        worst["output"] = max(worst["output"], rel_error(y_dec, mine_y) / tol_y)
        worst["grad_in"] = max(worst["grad_in"], rel_error(gin_dec, mine_g) / tol_g)

        # the same micro-batch from a corrupting stage: perturbed before encoding, as it would send it
        bad_up, bad_down = _pair(text)
        if ref is not None:  # the same state as the honest message met
            seen = ref[:, -1] > 0.5
            for codec in (bad_up, bad_down):
                codec.store.write(ids[seen], ref[seen, :-1].reshape(-1, S, H))
        bad = bad_down.decode_forward(CodecMessage.from_bytes(
            bad_up.encode_forward(faults.corrupt_sent(y.detach()), ids).to_bytes()), ids, dtype=torch.float32)
        assert rel_error(bad, mine_y) > tol_y, (step, rel_error(bad, mine_y), tol_y)
        if spec.bw_bits is None or spec.bw_bits >= 4:  # at 2 bits the rounding hides a gradient's noise
            bad_g = replay.sent_backward(into_down, into_down.encode_backward(faults.corrupt_sent(gin), ids))
            assert rel_error(bad_g, mine_g) > tol_g, (step, rel_error(bad_g, mine_g), tol_g)
    assert max(worst.values()) < 0.9, worst


def test_gradients_sent_with_error_feedback_are_not_checked():
    assert not replay.gradient_checkable(CodecSpec.parse("aqsgd:fw=4,bw=4,ef=1"))
    assert replay.gradient_checkable(CodecSpec.parse("aqsgd:fw=4,bw=4"))
    assert replay.gradient_checkable(CodecSpec.parse("none"))


def _verifier(codec: str, *, prob: float = 1.0) -> StageVerifier:
    plan = VerifyPlan(prob=prob, check=CheckRole(stage=1, replica=0, node_id="n10", seed=1,
                                                 witness_ids=frozenset({"n00", "n20"})))
    w = SimpleNamespace(a=SimpleNamespace(stage=1, replica=1, pipeline=1, job_id="j", attempt=1, is_first=False,
                                          is_last=False,
                                          spec=SimpleNamespace(codec=codec)),
                        M=4, b=B, S=S, H=H, timeout_s=5.0, stop_event=threading.Event(), _cur_step=3,
                        device=torch.device("cpu"), security=None, faults=FaultInjector(NO_FAULTS),
                        order=SimpleNamespace(micro_batches=lambda step, replica: [[0, 1], [2, 3], [4, 5], [0, 2]]))
    return StageVerifier(w, plan)


def _copy(kind: str, t: torch.Tensor, *, step: int = 3, micro_batch: int = 0):
    payload = wt.raw_encode(t.contiguous())
    h = wt.make_header(payload, job_id="j", step=step, micro_batch=micro_batch, sample_ids=(0, 1), shape=tuple(t.shape),
                       dtype="float32", codec="none", kind=kind, boundary=1, sender_id="n20", replica=0, attempt=1)
    return h, payload


def test_a_witness_copy_with_nan_or_bad_seen_flags_is_refused():
    """A non-finite copy would make any recomputation differ: a lying witness could frame the
    checked stage with it. The checker refuses it (the check is then void, never a mismatch)."""
    from node.training.exchange import Endpoint

    v = _verifier("aqsgd:fw=2,bw=4")
    endpoint = Endpoint("j", v.decode)  # what the checking worker's endpoint runs on every copy
    good = torch.zeros(B, S, H)
    assert torch.equal(v.decode(*_copy("witness_output", good)), good)
    bad = good.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidRequestError, match="NaN"):
        endpoint.accept(*_copy("witness_output", bad))
    assert not endpoint._items  # refused: nothing queued for the check
    ref = torch.zeros(B, S * H + 1)
    ref[:, -1] = 1.0
    assert v.decode(*_copy("witness_output_ref", ref)).shape == (B, S * H + 1)
    ref[1, -1] = 0.5
    with pytest.raises(InvalidRequestError, match="seen flags"):
        v.decode(*_copy("witness_output_ref", ref))
    with pytest.raises(InvalidRequestError):  # a reference of the wrong shape
        v.decode(*_copy("witness_output_ref", torch.zeros(B, S * H)))


def test_a_witness_sending_no_reference_voids_the_output_checks_without_holding_the_steps(monkeypatch):
    """An output witness older than compressed checks sends the decoded output but no m(x)
    reference: the checker waits REF_WAIT_S for it REF_MISSES_BEFORE_VOID times in a row, each
    such output check void (not a mismatch), then skips the output checks of the attempt instead
    of holding every checked step for a copy that never comes."""
    from node.training import spotcheck
    from node.training.exchange import Endpoint, _Slot

    monkeypatch.setattr(spotcheck, "REF_WAIT_S", 0.2)
    v = _verifier("aqsgd:fw=2,bw=4")
    target = _stage()
    endpoint = Endpoint("j", lambda h, p: None)
    v.w.endpoint, v.w.module = endpoint, _near_copy(target)
    v.w.membership = SimpleNamespace(fence_pending=threading.Event())
    v.w.runner = SimpleNamespace(loss_scale=1.0)
    v.w.order = SimpleNamespace(micro_batches=lambda step, replica: [[0, 1]])
    v.w.M = 1
    g = torch.Generator().manual_seed(4)
    for step in range(3, 3 + spotcheck.REF_MISSES_BEFORE_VOID + 1):
        assert v._no_refs == (step - 3 >= spotcheck.REF_MISSES_BEFORE_VOID)
        x, g_out = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)
        xin = x.clone().requires_grad_(True)
        y = target(xin)
        (g_in,) = torch.autograd.grad(y, [xin], grad_outputs=g_out)
        for kind, t in (("witness_input", x), ("witness_output", y.detach()), ("witness_grad_out", g_out),
                        ("witness_grad_in", g_in)):
            endpoint._items[(kind, step, 0)] = _Slot(t)  # as accept() queues a validated copy
        results = v.check_step(step)
        assert [r.what for r in results] == ["grad_in"] and all(r.match for r in results), results
    assert v._no_refs
