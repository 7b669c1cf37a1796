"""Trust but verify, the pure parts: fault config, compute challenge, claim rule, probe agreement, spot-check plans."""

import random

import pytest

from swarm.challenge import Solver, check_answer
from swarm.clock import FakeClock
from swarm.errors import ConfigError
from swarm.faults import FaultConfig
from swarm.membership import effective_tflops

from coordinator.jobs.spotchecks import Judge, verify_plans
from coordinator.network import probe_agreement
from coordinator.store import Database
from coordinator.verification import Challenges, TrustStore
from node.training.spotcheck import VerifyPlan, sampled


@pytest.mark.timeout(10)
def test_fault_config_parses_once_and_refuses_nonsense():
    f = FaultConfig.parse("corrupt-activations=0.2, claim-tflops=10000,stall-after-steps=5")
    assert (f.corrupt_activations, f.claim_tflops, f.stall_after_steps, f.wrong_tokens) == (0.2, 10000.0, 5, 0.0)
    assert not FaultConfig.parse("").any and FaultConfig.parse(None) == FaultConfig()
    g = FaultConfig.parse("claim-mem-bandwidth=4e8,claim-device=fast gpu")
    assert (g.claim_mem_bandwidth, g.claim_device, g.any) == (4e8, "fast gpu", True)
    assert FaultConfig.parse("false-checks=1").false_checks == 1.0 and FaultConfig.parse("false-checks=0.5").any
    for bad in ("corrupt-activations=2", "false-checks=-1", "fly=1", "stall-after-steps", "claim-tflops=x", "claim-mem-bandwidth=1e3"):
        with pytest.raises(ConfigError):
            FaultConfig.parse(bad)


@pytest.mark.timeout(30)
def test_challenge_passes_honest_answers_and_catches_wrong_rows(tmp_path):
    clock = FakeClock()
    trust = TrustStore(Database(tmp_path), clock)
    ch = Challenges(trust, clock, rng=random.Random(1))
    cid, seed, n, count, target_s = ch.start("a" * 32, "cpu")
    solver = Solver(seed, 256, 2, target_s=0.0)  # the coordinator's n is 1024 on CPU; a small one here
    ch._pending[cid].n = 256
    commitment, done = solver.compute()
    clock.advance(0.5)
    rows = ch.commit("a" * 32, cid, commitment, done)
    digests, opened = solver.open(rows)
    passed, tflops, msg = ch.open("a" * 32, cid, digests, opened)
    assert passed and tflops == pytest.approx(done * 2 * 256 ** 3 / 0.5 / 1e12), msg
    assert trust.get("a" * 32).challenge_tflops == tflops
    bad = bytearray(opened)
    bad[:4] = b"\0\0\0\0"
    assert "digest" in check_answer(seed=seed, n=256, count=done, commitment=commitment, rows=rows,
                                    row_digests=digests, row_bytes=bytes(bad))


def test_claims_more_than_twice_the_measurement_are_replaced():
    assert effective_tflops(10000.0, 0.01) == 0.01
    assert effective_tflops(0.019, 0.01) == 0.019  # within 2x: the claim stands
    assert effective_tflops(5.0, None) == 5.0


def test_probe_ends_must_agree():
    assert probe_agreement(1e13, 1e8) == (1e8, False, True)  # a liar's figure: disputed, the lower kept
    assert probe_agreement(1.0e8, 0.9e8) == (0.9e8, True, False)
    assert probe_agreement(1.0e8, None) == (1.0e8, False, False)


def test_spot_check_plans_never_tell_a_stage_its_own_seed():
    asg = [{"node_id": f"n{s}{r}", "address": f"h:{s}{r}", "stage": s, "replica": r, "num_replicas": 2}
           for s in range(2) for r in range(2)]
    plans = verify_plans(asg, prob=0.5, secret=7)
    for a, v in zip(asg, plans):
        plan = VerifyPlan.from_json(__import__("json").dumps(v))
        assert (plan.check.stage, plan.check.replica) == (a["stage"], 1 - a["replica"])
        assert all((w.stage, w.replica) != (a["stage"], a["replica"]) for w in plan.witness)
    assert verify_plans(asg[:2], prob=0.5) != [] and all(not v for v in verify_plans(
        [dict(x, num_replicas=1) for x in asg[::2]], prob=0.5))
    hits = sum(sampled(3, step, 0, 0.02) for step in range(20000))
    assert 300 < hits < 500


def test_judge_weighs_only_confirmed_mismatches_from_the_designated_checker():
    asg = [{"node_id": f"n{s}{r}", "stage": s, "replica": r, "num_replicas": 2} for s in range(2) for r in range(2)]
    j = Judge()
    check = {"stage": 0, "replica": 0, "step": 3, "micro_batch": 0, "what": "output", "match": False, "error": 1.2,
             "tolerance": 0.5, "repeated_match": True, "value": 0.0}
    r = {"step": 3, "checks": [check], "param_digest": "d"}  # same weights on both (their digests agree)
    assert j.report("j", 1, asg[0], asg, r) == []  # (0,0) cannot check itself
    assert j.take_disputes("j") == []
    # (0,1) is the checker of (0,0): its word opens a dispute (tests/unit/foundation/test_disputed_checks.py)
    assert j.report("j", 1, asg[1], asg, r) == []
    (d,) = j.take_disputes("j")
    assert (d.target, d.accuser, d.step) == ("n00", "n01", 3)
    j2 = Judge()
    assert j2.report("j", 1, asg[1], asg, {"step": 3, "checks": [dict(check, repeated_match=False)],
                                           "param_digest": "d"}) == [] and j2.take_disputes("j") == []


def _sync_job(R):
    asg = [{"node_id": f"n{r}", "stage": 0, "replica": r, "num_replicas": R} for r in range(R)]
    return asg, Judge()


def _sketches(j, asg, step, sketches):
    """Every replica of stage 0 reports ``sketches[r]`` for ``step``; the verdicts."""
    out = []
    for a, sk in zip(asg, sketches):
        out += j.report("j", 1, a, asg, {"step": step, "checks": [], "param_sketch": sk})
    return out


@pytest.mark.timeout(10)
def test_a_replica_apart_from_all_others_through_three_resyncs_is_guilty():
    from coordinator.jobs.spotchecks import APART_STEPS

    asg, j = _sync_job(3)
    same, far = [1.0] * 8, [1.0] * 7 + [2.0]
    for step in range(APART_STEPS):  # apart, but not yet for long enough
        assert _sketches(j, asg, step, [same, far, same]) == []
    (v,) = _sketches(j, asg, APART_STEPS, [same, far, same])
    assert v.node_id == "n1" and v.first_bad_step == 0 and "misreports" in v.reason
    # a failed round: apart, then the re-sync brings it back: the streak starts over
    asg, j = _sync_job(3)
    for step in range(2 * APART_STEPS):
        apart = step % APART_STEPS < APART_STEPS - 5
        assert _sketches(j, asg, step, [same, far if apart else same, same]) == []
    # a replica that sends no sketch at all while the others do stands apart just the same
    asg, j = _sync_job(3)
    verdicts = [v for step in range(APART_STEPS + 1) for v in _sketches(j, asg, step, [same, same, ()])]
    assert [v.node_id for v in verdicts] == ["n2"]
    # an unchecked job (nobody sends sketches) is not watched
    asg, j = _sync_job(3)
    assert all(_sketches(j, asg, step, [(), (), ()]) == [] for step in range(2 * APART_STEPS))
    # two replicas disagreeing with each other and the third: nobody stands alone
    asg, j = _sync_job(3)
    assert all(_sketches(j, asg, step, [same, far, [3.0] * 8]) == [] for step in range(2 * APART_STEPS))
    assert j.take_notices("j") == []


@pytest.mark.timeout(10)
def test_two_replicas_apart_through_three_resyncs_are_reported_not_judged():
    from coordinator.jobs.spotchecks import APART_STEPS

    asg, j = _sync_job(2)
    same, far = [1.0] * 8, [1.0] * 7 + [2.0]
    for step in range(APART_STEPS + 1):
        assert _sketches(j, asg, step, [same, far]) == []
    ((message, fields),) = j.take_notices("j")
    assert fields == {"stage": 0, "since_step": 0, "step": APART_STEPS, "nodes": ["n0", "n1"]}
    assert "void" in message and "3 replicas" in message
    assert j.take_notices("j") == []  # each once
    assert all(_sketches(j, asg, s, [same, far]) == [] for s in range(APART_STEPS + 1, 3 * APART_STEPS))
    assert j.take_notices("j") == []  # one event per attempt and stage
    asg, j = _sync_job(2)  # a pair where one sends no sketch: reported too
    assert all(_sketches(j, asg, s, [same, ()]) == [] for s in range(APART_STEPS + 1))
    assert len(j.take_notices("j")) == 1
    # honest replicas (within SYNC_TOLERANCE) never make a notice
    asg, j = _sync_job(2)
    assert all(_sketches(j, asg, s, [same, [1.0] * 7 + [1.0001]]) == [] for s in range(2 * APART_STEPS))
    assert j.take_notices("j") == []


def test_the_planned_event_says_whether_results_are_spot_checked():
    from coordinator.jobs.spotchecks import checks_clause

    on, text = checks_clause(num_replicas=2, prob=0.05)
    assert on and "probability 0.05" in text
    off, text = checks_clause(num_replicas=1, prob=0.05)
    assert not off and "--replicas 2" in text  # says what to do to get checks
    assert checks_clause(num_replicas=3, prob=0.0) == (False, "spot checks off (--verify-prob 0)")
    assert "ef=1" in checks_clause(num_replicas=2, prob=0.05, error_feedback=True)[1]
