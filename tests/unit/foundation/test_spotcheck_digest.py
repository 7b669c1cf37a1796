"""Training spot checks are sound: a check is weighed only between replicas that provably ran the
same weights (equal parameter digests), so an honest node is never found wrong, while a node that
corrupts what it sends is (docs/security.md "Verification")."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from swarm.faults import FaultConfig, FaultInjector
from swarm.model import ModelConfig, StageModel, build_stage

from coordinator.jobs.spotchecks import JUDGE_AFTER_PEER_TIMEOUTS, SYNC_TOLERANCE, Judge, weights_distance
from node.training.spotcheck import TOLERANCE, SpotResult, recompute, rel_error
from node.training.weight_sketch import SKETCH_SIZE, param_digest, param_sketch

CFG = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=3, num_heads=2,
                  max_position_embeddings=16, tie_word_embeddings=False)
B, S, H = 2, 8, 32
ASG = [{"node_id": f"n{s}{r}", "stage": s, "replica": r, "num_replicas": 2} for s in range(3) for r in range(2)]
TARGET, CHECKER = ASG[2], ASG[3]  # stage 1 replica 0 is checked by stage 1 replica 1


def _middle_stage() -> StageModel:
    full = build_stage(CFG, 0, 3, seed=0)
    s = StageModel(CFG, 1, 2, is_first=False, is_last=False)
    s.load_hf_state(full.hf_state_dict())
    return s


def _run(stage: StageModel, x: torch.Tensor, g_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a worker does with a micro-batch: forward, then the input gradient."""
    xin = x.clone().requires_grad_(True)
    y = stage(xin)
    y.backward(g_out)
    return y.detach(), xin.grad.detach()


def _check(checker: StageModel, x, y, g_out, g_in, step: int) -> list[dict]:
    """The checker's recomputation and comparison, as StageVerifier.check_step reports it."""
    mine_y, mine_gin = recompute(checker, x=x, is_first=False, is_last=False, labels=None, grad_out=g_out,
                                 loss_scale=1.0)
    out = []
    for what, mine, theirs in (("output", mine_y, y), ("grad_in", mine_gin, g_in)):
        err = rel_error(theirs, mine)
        out.append(dataclasses.asdict(SpotResult(stage=1, replica=0, step=step, micro_batch=0, what=what,
                                                 match=err <= TOLERANCE[what], error=err, tolerance=TOLERANCE[what],
                                                 repeated_match=True)))
    return out


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)


def test_param_digest_is_exact_bytes():
    a = _middle_stage()
    b = copy.deepcopy(a)
    assert param_digest(a.parameters()) == param_digest(b.parameters())
    with torch.no_grad():
        p = next(b.parameters())
        p.view(-1)[7] = torch.nextafter(p.view(-1)[7], torch.tensor(float("inf")))  # one ulp in one element
    assert param_digest(a.parameters()) != param_digest(b.parameters())


def test_honest_stage_passes_and_a_corrupting_stage_is_accused_with_the_same_weights():
    target = _middle_stage()
    checker = copy.deepcopy(target)  # a replica in sync (the averaging round succeeded)
    digest = param_digest(target.parameters())
    assert digest == param_digest(checker.parameters())
    x, g_out = _inputs(1)
    y, g_in = _run(target, x, g_out)

    j = Judge()
    honest = _check(checker, x, y, g_out, g_in, step=0)
    assert all(c["match"] and c["error"] < 1e-4 for c in honest), honest  # float noise only, far below 0.1
    assert j.report("j", 1, TARGET, ASG, {"step": 0, "param_digest": digest}) == []
    assert j.report("j", 1, CHECKER, ASG, {"step": 0, "param_digest": digest, "checks": honest}) == []

    faults = FaultInjector(FaultConfig.parse("corrupt-activations=1.0"))
    bad_y = faults.corrupt_sent(y)  # what SWARM_FAULT makes the node send instead
    bad = _check(checker, x, bad_y, g_out, g_in, step=1)
    assert not bad[0]["match"] and bad[0]["error"] > 0.5
    # the checker's report may come first: the check waits for the target's digest of that step
    assert j.report("j", 1, CHECKER, ASG, {"step": 1, "param_digest": digest, "checks": bad}) == []
    assert j.report("j", 1, TARGET, ASG, {"step": 1, "param_digest": digest}) == []
    # one checker's word opens a dispute; a second checker decides it (test_disputed_checks.py)
    (d,) = j.take_disputes("j")
    assert d.target == TARGET["node_id"] and d.step == 1 and "same weights" in d.reason
    assert j.stats("j") == {"checks": 4, "mismatches": 1, "unverifiable": 0, "weighed": 4, "bound": 0, "contested": 0}


def test_drifted_replicas_are_never_compared():
    """A failed averaging round: each replica stepped with its own gradients. An honest target's
    output then differs from the checker's recomputation (the earlier false positive); with
    different digests the check is not weighed at all."""
    target = _middle_stage()
    checker = copy.deepcopy(target)
    for model, seed in ((target, 2), (checker, 3)):  # one AdamW step each, on different data
        opt = torch.optim.AdamW(model.parameters(), lr=0.3)
        x, g_out = _inputs(seed)
        _run(model, x, g_out)
        opt.step()
    d_target, d_checker = param_digest(target.parameters()), param_digest(checker.parameters())
    assert d_target != d_checker
    x, g_out = _inputs(4)
    y, g_in = _run(target, x, g_out)  # honest
    checks = _check(checker, x, y, g_out, g_in, step=5)
    assert not checks[0]["match"], "drift makes an honest output look wrong: the case the digests exist for"
    j = Judge()
    assert j.report("j", 1, TARGET, ASG, {"step": 5, "param_digest": d_target}) == []
    assert j.report("j", 1, CHECKER, ASG, {"step": 5, "param_digest": d_checker, "checks": checks}) == []
    assert j.stats("j") == {"checks": 2, "mismatches": 0, "unverifiable": 2, "weighed": 0, "bound": 0, "contested": 0}
    # their sketches tell the same: far beyond SYNC_TOLERANCE
    assert weights_distance(param_sketch(target.parameters()), param_sketch(checker.parameters())) > 10 * SYNC_TOLERANCE
    # a node that reports no digest (or an old node) is never judged either
    assert j.report("j", 1, TARGET, ASG, {"step": 6}) == []
    assert j.report("j", 1, CHECKER, ASG, {"step": 6, "param_digest": d_checker,
                                           "checks": [dict(c, step=6) for c in checks]}) == []


def _fp16_round_trip_drift(model: StageModel, seed: int) -> None:
    """What a successful hivemind round leaves between replicas: each holds the mean plus its own
    fp16 rounding (of the delta it was sent), ~1e-4 relative (swarm/pipeline/averaging.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p * torch.randn(p.shape, generator=g) * 2.0 ** -12)


def test_near_replicas_are_weighed_by_their_sketches():
    """Replicas after a successful averaging round differ by fp16 rounding: never bit-identical
    (different digests) but within SYNC_TOLERANCE by their sketches, so checks weigh: an honest
    target passes, a corrupting one is quarantined."""
    target = _middle_stage()
    checker = copy.deepcopy(target)
    _fp16_round_trip_drift(target, 1)
    _fp16_round_trip_drift(checker, 2)
    assert param_digest(target.parameters()) != param_digest(checker.parameters())
    rt, rc = ({"param_digest": param_digest(m.parameters()), "param_sketch": param_sketch(m.parameters())}
              for m in (target, checker))
    dist = weights_distance(rc["param_sketch"], rt["param_sketch"])
    assert 1e-5 < dist < SYNC_TOLERANCE / 3, dist
    j = Judge()
    x, g_out = _inputs(7)
    y, g_in = _run(target, x, g_out)
    honest = _check(checker, x, y, g_out, g_in, step=2)
    assert all(c["match"] and c["error"] < TOLERANCE[c["what"]] / 100 for c in honest), honest
    assert j.report("j", 1, TARGET, ASG, {"step": 2, **rt}) == []
    assert j.report("j", 1, CHECKER, ASG, {"step": 2, **rc, "checks": honest}) == []
    bad_y = FaultInjector(FaultConfig(corrupt_activations=1.0)).corrupt_sent(y)
    bad = _check(checker, x, bad_y, g_out, g_in, step=3)
    assert j.report("j", 1, CHECKER, ASG, {"step": 3, **rc, "checks": bad}) == []  # waits for the target
    assert j.report("j", 1, TARGET, ASG, {"step": 3, **rt}) == []
    (d,) = j.take_disputes("j")  # weighed: the checker's accusation stands, for a second checker to decide
    assert d.target == TARGET["node_id"] and d.step == 3
    assert j.stats("j") == {"checks": 4, "mismatches": 1, "unverifiable": 0, "weighed": 4, "bound": 0, "contested": 0}


def test_sketch_distance_estimates_the_weights_distance():
    a = _middle_stage()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    true = float((flat(b) - flat(a)).norm() / flat(a).norm())
    est = weights_distance(param_sketch(b.parameters()), param_sketch(a.parameters()))
    assert 0.5 * true < est < 2 * true, (est, true)
    assert weights_distance(param_sketch(a.parameters()), param_sketch(a.parameters())) == 0.0
    assert weights_distance((), param_sketch(a.parameters())) == float("inf")


def test_a_check_of_another_step_than_the_report_is_ignored():
    j = Judge()
    check = {"stage": 1, "replica": 0, "step": 3, "micro_batch": 0, "what": "output", "match": False, "error": 1.2,
             "tolerance": 0.1, "repeated_match": True, "value": 0.0}
    j.report("j", 1, TARGET, ASG, {"step": 3, "param_digest": "d"})
    assert j.report("j", 1, CHECKER, ASG, {"step": 4, "param_digest": "d", "checks": [check]}) == []
    assert j.stats("j")["checks"] == 0


def test_witness_copies_are_accepted_only_from_the_checked_stages_assigned_neighbours():
    """Caller ids come from certificates; the same check runs for PushTensor and the stream."""
    from types import SimpleNamespace

    import pytest

    from swarm.errors import PermissionDeniedError
    from node.training.spotcheck import CheckRole, VerifyPlan
    from node.training.worker import StageWorker

    plan = VerifyPlan(prob=1.0, check=CheckRole(stage=1, replica=0, node_id="n10", seed=1,
                                                witness_ids=frozenset({"n00", "n20"})))
    me = SimpleNamespace(a=SimpleNamespace(stage=1, replica=1, job_id="j", attempt=1, prev=None, next=None),
                         verifier=SimpleNamespace(plan=plan))
    ok = SimpleNamespace(kind="witness_input", boundary=1, replica=0)
    StageWorker._authorize_sender(me, "n00", ok)
    StageWorker._authorize_sender(me, "n20", SimpleNamespace(kind="witness_output", boundary=1, replica=0))
    for caller, h in (("n01", ok), ("n10", ok),  # another replica's neighbour; the checked node itself
                      ("n00", SimpleNamespace(kind="witness_input", boundary=0, replica=0)),  # another target
                      ("n00", SimpleNamespace(kind="witness_input", boundary=1, replica=1))):
        with pytest.raises(PermissionDeniedError):
            StageWorker._authorize_sender(me, caller, h)
    with pytest.raises(PermissionDeniedError):  # a stage that checks nothing takes no copies
        StageWorker._authorize_sender(SimpleNamespace(a=me.a, verifier=None), "n00", ok)


def test_stall_blame_spares_lost_nodes_and_nodes_waiting_on_someone_else():
    j = Judge()
    # stage 1 waits on a crashed stage 2 and blames it; stage 0 then blames stage 1
    j.blame("j", "s1", "s2", 100.0)
    j.blame("j", "s0", "s1", 101.0)
    verdicts, dispute = j.resolve_blames("j", 200.0, grace_s=30.0, is_online=lambda n: n != "s2")
    assert verdicts == [] and dispute  # s2 is lost (not stalling), s1 was waiting itself: re-plan, nobody quarantined
    # the re-plan's attempt: the old blames are settled; a silent node that is online and waits
    # on nobody is stalled
    j.blame("j", "s0", "s1", 300.0, attempt=1)
    (v,) = j.resolve_blames("j", 400.0, grace_s=30.0, attempt=1)[0]
    assert v.node_id == "s1" and v.first_bad_step is None


def test_a_stall_is_judged_on_silence_after_the_blame():
    """The accuser starts waiting when it sent its step; the staller's report of its last step may
    land a moment before the blame. Silent from then until grace_s after the blame: stalled. A
    node that reports progress after the blame was only slow."""
    j = Judge()
    j.progress("j", "s1", 99.0)  # its last report, 1 s before the blame
    j.blame("j", "s0", "s1", 100.0)
    # not yet: s1 may be waiting on someone else, and its own blame may take two peer timeouts
    assert j.resolve_blames("j", 100.0 + JUDGE_AFTER_PEER_TIMEOUTS * 30.0 - 1, grace_s=30.0) == ([], False)
    (v,) = j.resolve_blames("j", 100.0 + JUDGE_AFTER_PEER_TIMEOUTS * 30.0, grace_s=30.0)[0]
    assert v.node_id == "s1" and "stalled" in v.reason
    j.blame("j", "s0", "s1", 200.0)
    j.progress("j", "s1", 210.0)  # slow, not stalled
    assert j.resolve_blames("j", 300.0, grace_s=30.0) == ([], True)


def test_a_stall_seen_only_after_a_coordinator_restart_is_timed_from_the_restart():
    j = Judge()  # a restarted coordinator: no report of s1 in memory
    j.progress("j", "s0", 1000.0)
    j.blame("j", "s0", "s1", 1001.0)
    (v,) = j.resolve_blames("j", 1001.0 + JUDGE_AFTER_PEER_TIMEOUTS * 30.0, grace_s=30.0)[0]
    assert v.node_id == "s1" and "no progress for 91 s" in v.reason  # not for 1091 s


def test_a_node_held_up_behind_a_staller_blames_it_in_time_and_is_spared():
    """A 2 x 2 job: s00 stalls; s01 (stage 0, replica 1) waits a peer timeout for s00 in gradient
    averaging, so its stage 1 (s11) blames it; s01 then blames s11, which stopped, within two
    peer timeouts. Only the staller is quarantined."""
    j = Judge()
    for n in ("s00", "s10", "s01", "s11"):
        j.progress("j", n, 99.0)
    j.blame("j", "s10", "s00", 130.0)  # stage 1 of replica 0 waited for the staller's activation
    j.blame("j", "s11", "s01", 131.0)  # stage 1 of replica 1 waited for a node held up in averaging
    j.blame("j", "s01", "s11", 185.0)  # that node, back from averaging, waited for s11 (stopped)
    verdicts, dispute = j.resolve_blames("j", 131.0 + JUDGE_AFTER_PEER_TIMEOUTS * 30.0, grace_s=30.0)
    assert [v.node_id for v in verdicts] == ["s00"] and dispute
    # the job re-plans (attempt 1): the blame still pending from attempt 0 is dropped, not judged
    assert j.resolve_blames("j", 500.0, grace_s=30.0, attempt=1) == ([], False) and not j.has_blames("j")


@pytest.mark.timeout(60)
def test_a_checker_waits_for_no_witness_while_the_attempt_is_fenced(monkeypatch):
    """A stage-0 replica lost: its pipeline's stages send no more witnesses, and a checker that
    waited 10 s for each copy held up the fence (40 s measured); during a fence it gives up at once,
    and after one missing copy it waits for no other of the step."""
    import threading
    from types import SimpleNamespace

    from node.training import spotcheck
    from node.training.exchange import Endpoint
    from node.training.spotcheck import CheckRole, StageVerifier, VerifyPlan

    monkeypatch.setattr(spotcheck, "WITNESS_WAIT_S", 3600.0)  # only the fence can end the wait

    plan = VerifyPlan(prob=1.0, check=CheckRole(stage=1, replica=0, node_id="n10", seed=1,
                                                witness_ids=frozenset({"n00", "n20"})))
    fence = threading.Event()
    asked = []
    endpoint = Endpoint("j", lambda h, p: None)
    real_get = endpoint.get
    endpoint.get = lambda kind, *a, **k: asked.append(kind) or real_get(kind, *a, **k)
    w = SimpleNamespace(a=SimpleNamespace(stage=1, replica=1, pipeline=1, job_id="j", is_first=False, is_last=False,
                                          spec=SimpleNamespace(codec="none")),
                        M=4, timeout_s=3600.0, stop_event=threading.Event(), endpoint=endpoint,
                        membership=SimpleNamespace(fence_pending=fence),
                        order=SimpleNamespace(micro_batches=lambda step, replica: [[0], [1], [2], [3]]))
    v = StageVerifier(w, plan)
    fence.set()
    assert v.check_step(5) == []
    assert asked == ["witness_input"]  # the first missing copy ends the step's checks


def test_sketches_of_another_size_or_dtype():
    """An older node's 64-bucket sketch is never compared with a 128-bucket one (void, not a
    misread distance); half-precision weights sketch like their float32 values."""
    a = _middle_stage()
    s = param_sketch(a.parameters())
    assert len(s) == SKETCH_SIZE == 128
    assert weights_distance(s[:64], s) == float("inf")
    halves = [p.detach().half() for p in a.parameters()]
    est = weights_distance(param_sketch(halves), param_sketch([h.float() for h in halves]))
    assert est == 0.0
