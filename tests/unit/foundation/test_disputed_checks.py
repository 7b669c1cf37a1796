"""Disputed spot checks (coordinator/jobs/disputes.py, through spotchecks.py ``Judge``;
coordinator/jobs/planning.py ``separate``): one checker's word opens a dispute, a second checker
decides it, and a checker that accuses whoever it checks is the one found guilty."""

import pytest

from swarm.errors import InvalidRequestError

from swarm.scheduling.plan import Plan, PlanStage

from coordinator.jobs.planning import conflicts, separate, JobPlan, assignments_from_plan
from coordinator.jobs.spotchecks import Judge
from tests.unit.training.test_job_shape_events import _node


def _asg(layout):
    """assignments of ``layout``: stage -> [node id per replica]."""
    return [{"node_id": n, "address": f"h:{n}", "stage": s, "replica": r, "num_replicas": len(devs)}
            for s, devs in enumerate(layout) for r, n in enumerate(devs)]


def _bad(stage, replica, step, what="output"):
    return {"stage": stage, "replica": replica, "step": step, "micro_batch": 0, "what": what, "match": False,
            "error": 1.2, "tolerance": 0.5, "repeated_match": True, "value": 0.0}


def _accuse(j, attempt, asg, checker, target, step):
    """``checker`` (node id) reports a confirmed mismatch of ``target`` at ``step``; the verdicts."""
    at = {a["node_id"]: a for a in asg}
    t, c = at[target], at[checker]
    out = j.report("j", attempt, t, asg, {"step": step, "param_digest": "d"})
    out += j.report("j", attempt, c, asg, {"step": step, "param_digest": "d",
                                           "checks": [_bad(t["stage"], t["replica"], step)]})
    return out


@pytest.mark.timeout(10)
def test_one_checker_opens_a_dispute_and_a_second_checker_convicts():
    j = Judge()
    asg = _asg([["x", "t"], ["z", "w"]])  # x checks t (replica 1 checks replica 0)
    assert _accuse(j, 1, asg, "x", "t", 3) == []
    (d,) = j.take_disputes("j")
    assert (d.accuser, d.target, d.step, d.attempt) == ("x", "t", 3, 1) and "step 3" in d.reason
    assert j.take_disputes("j") == []  # each returned once
    assert _accuse(j, 1, asg, "x", "t", 4) == [] and j.take_disputes("j") == []  # the same checker adds nothing
    # re-planned with x and t apart: w now checks t, and finds it wrong too
    asg2 = _asg([["x", "z"], ["t", "w"]])
    (v,) = _accuse(j, 2, asg2, "w", "t", 6)
    # rolled back to before the first accusation: t's work since that rollback is suspect too
    assert v.node_id == "t" and v.first_bad_step == 3 and "also found wrong by node(s) x" in v.reason
    assert j.take_disputes("j") == []


@pytest.mark.timeout(10)
def test_a_checker_accusing_two_nodes_nobody_else_faults_is_guilty_and_its_targets_start_over():
    j = Judge()
    assert _accuse(j, 1, _asg([["x", "t"], ["z", "w"]]), "x", "t", 2) == []
    assert len(j.take_disputes("j")) == 1
    asg2 = _asg([["x", "z"], ["t", "w"]])
    (v,) = _accuse(j, 2, asg2, "x", "z", 5)
    assert v.node_id == "x" and v.first_bad_step is None and "misreports its checks" in v.reason
    assert j.take_disputes("j") == []  # no dispute for the liar's second accusation
    assert _accuse(j, 2, asg2, "x", "z", 6) == [] and j.take_disputes("j") == []  # nor for any later one
    # t's record is clean again: a later (honest) accuser of t opens a dispute, not a verdict
    assert _accuse(j, 2, asg2, "w", "t", 7) == []
    assert [d.accuser for d in j.take_disputes("j")] == ["w"]


@pytest.mark.timeout(10)
def test_a_wrong_loss_is_an_accusation_too():
    j = Judge()
    asg = _asg([["a", "b"], ["x", "t"]])
    at = {a["node_id"]: a for a in asg}
    assert j.report("j", 1, at["t"], asg, {"step": 1, "param_digest": "d", "micro_batch_losses": [2.0]}) == []
    loss = dict(_bad(1, 1, 1, what="loss"), match=True, value=3.0)
    assert j.report("j", 1, at["x"], asg, {"step": 1, "param_digest": "d", "checks": [loss]}) == []
    (d,) = j.take_disputes("j")
    assert d.target == "t" and "reported loss 2.0000" in d.reason


def _jp(layout):
    nodes = {f"node{i}": _node(i) for i in range(8)}
    plan = Plan(stages=tuple(PlanStage(layers=(s, s + 1), devices=tuple(devs)) for s, devs in enumerate(layout)),
                objective="dtfm_comm", cost_s=1.0, dp_s=0.0, pp_s=0.0)
    return JobPlan(plan=plan, assignments=assignments_from_plan(plan, nodes)), nodes


def _neighbours(plan, a, b):
    devs = [list(st.devices) for st in plan.stages]
    return any({x, y} == {a, b} for s in range(len(devs) - 1) for x, y in zip(devs[s], devs[s + 1]))


@pytest.mark.timeout(10)
def test_separate_parts_accuser_and_accused_and_keeps_the_split():
    jp, nodes = _jp([["node0", "node1"], ["node2", "node3"]])
    apart = {frozenset(("node0", "node1"))}
    assert conflicts(jp.plan, apart) == [("node0", "node1")]
    out = separate(jp, apart, nodes)
    assert conflicts(out.plan, apart) == [] and not _neighbours(out.plan, "node0", "node1")
    assert sorted(d for st in out.plan.stages for d in st.devices) == sorted(nodes)[:4]  # the same nodes
    assert [st.layers for st in out.plan.stages] == [(0, 1), (1, 2)]
    by = {a["node_id"]: a for a in out.assignments}
    assert by["node0"]["stage"] != by["node1"]["stage"]
    assert all(a["next"] is None or a["next"]["node_id"] != "node1" for a in out.assignments if a["node_id"] == "node0")
    # a second pair: both apart, both kept off one stage
    apart2 = apart | {frozenset(("node1", "node3"))}
    out2 = separate(jp, apart2, nodes)
    assert conflicts(out2.plan, apart2) == []
    # nothing to do: the same plan back
    assert separate(out, apart, nodes) is out
    # three stages of one: the pair ends neither on one stage nor as neighbours
    jp3, nodes3 = _jp([["node0"], ["node1"], ["node2"]])
    out3 = separate(jp3, {frozenset(("node0", "node1"))}, nodes3)
    assert not _neighbours(out3.plan, "node0", "node1")


@pytest.mark.timeout(10)
def test_separate_gives_up_when_no_swap_can_part_a_pair():
    jp, nodes = _jp([["node0", "node1"]])  # one stage: nowhere to move either
    assert separate(jp, {frozenset(("node0", "node1"))}, nodes) is None
    jp2, nodes2 = _jp([["node0", "node1"], ["node2", "node3"]])
    every = {frozenset((a, b)) for a in nodes2 for b in nodes2 if a != b}
    assert separate(jp2, every, nodes2) is None


@pytest.mark.timeout(10)
def test_false_checks_turns_results_into_confirmed_mismatches():
    from node.training.spotcheck import SpotResult, _falsified

    base = dict(stage=0, replica=1, step=4, micro_batch=2, error=0.01, tolerance=0.1)
    out = _falsified(SpotResult(**base, what="output", match=True, repeated_match=True))
    assert not out.match and out.repeated_match and out.error > out.tolerance
    loss = _falsified(SpotResult(**base, what="loss", match=True, repeated_match=True, value=2.0))
    assert loss.value == pytest.approx(2.2)


@pytest.mark.timeout(10)
def test_an_accused_node_is_checked_closely_by_its_witnesses_and_checker_and_never_told():
    import json

    from coordinator.jobs.disputes import PROBATION_PROB
    from coordinator.jobs.spotchecks import verify_plans
    from node.training.spotcheck import VerifyPlan

    asg = _asg([["x", "t"], ["z", "w"]])
    plans = verify_plans(asg, prob=0.05, secret=3, probation={"t": 40})
    by = {a["node_id"]: VerifyPlan.from_json(json.dumps(v)) for a, v in zip(asg, plans)}
    # t is (0, 1): checked by x (0, 0), witnessed by w (1, 1)
    assert by["x"].check.node_id == "t" and by["x"].check.prob_at(39, 0.05) == PROBATION_PROB
    assert by["x"].check.prob_at(40, 0.05) == 0.05  # probation ends
    (role,) = by["w"].witness
    assert (role.stage, role.replica) == (0, 1) and role.prob_at(10, 0.05) == PROBATION_PROB
    assert by["t"].check.prob_at(10, 0.05) == 0.05 and all(r.prob_at(10, 0.05) == 0.05 for r in by["t"].witness)
    assert "probation" not in json.dumps(plans[[a["node_id"] for a in asg].index("t")])
    assert by["z"].check.prob_at(10, 0.05) == 0.05  # z checks w, not on probation
    with pytest.raises(Exception, match="probation"):
        VerifyPlan.from_json(json.dumps(dict(plans[0], check=dict(plans[0]["check"], probation_prob=2.0))))
    with pytest.raises(InvalidRequestError, match="malformed verify plan"):  # not an OverflowError
        VerifyPlan.from_json(json.dumps(dict(plans[0], check=dict(plans[0]["check"], probation_until=float("inf")))))


@pytest.mark.timeout(30)
def test_a_dispute_replans_the_pair_apart_with_probation_and_a_restarted_coordinator_remembers_it(tmp_path):
    import json

    from coordinator.jobs.service import JobService
    from tests.unit.training.test_job_shape_events import SPEC, _pending, _service

    service = _service(tmp_path, n=4)
    _pending(service, "j", SPEC.replace(num_stages=2, num_replicas=2))
    service.tick()
    job = service.store.get("j")
    at = {(a["stage"], a["replica"]): a for a in job.assignments}
    t, x = at[(0, 0)], at[(0, 1)]  # (0, 1) checks (0, 0)
    service.judge.report("j", job.attempt, t, job.assignments, {"step": 2, "param_digest": "d"})
    service.judge.report("j", job.attempt, x, job.assignments, {"step": 2, "param_digest": "d",
                                                                "checks": [_bad(0, 0, 2)]})
    service.tick()
    job = service.store.get("j")
    assert job.attempt == 2 and job.resume_step == 0
    (e,) = [e for e in service.store.events("j") if e["kind"] == "disputed"]
    assert (e["fields"]["accuser"], e["fields"]["node"], e["fields"]["step"]) == (x["node_id"], t["node_id"], 2)
    by = {a["node_id"]: a for a in job.assignments}
    assert by[t["node_id"]]["stage"] != by[x["node_id"]]["stage"]
    checker = next(a for a in job.assignments if a["verify"].get("check", {}).get("node_id") == t["node_id"])
    assert checker["verify"]["check"]["probation_until"] == 2 + 20
    assert "probation" not in json.dumps(by[t["node_id"]]["verify"]["check"])  # t checks someone else
    # the coordinator restarts: the accusation, the pair and the probation come back from the events
    again = JobService(store=service.store, state_dir=tmp_path / "state", registry=service.registry,
                       network=service.network, clock=service.clock)
    again.start()
    again.stop()
    assert again._apart["j"] == {frozenset((x["node_id"], t["node_id"]))}
    assert again._probation["j"] == {t["node_id"]: 22}
    # a second checker of t now convicts it (the first accusation was remembered)
    asg = job.assignments
    (v,) = (again.judge.report("j", 2, by[t["node_id"]], asg, {"step": 3, "param_digest": "d"})
            + again.judge.report("j", 2, checker, asg, {"step": 3, "param_digest": "d", "checks": [
                _bad(by[t["node_id"]]["stage"], by[t["node_id"]]["replica"], 3)]}))
    assert v.node_id == t["node_id"] and v.first_bad_step == 2


def _accused_in_a_running_job(tmp_path, *, nodes: int, stages: int):
    """A job of ``stages`` x 2 replicas on ``nodes`` fake nodes, where (0, 1) reported a
    confirmed mismatch of (0, 0) at step 2: (service, target, accuser, quarantined list)."""
    from tests.unit.training.test_job_shape_events import SPEC, _pending, _service

    service = _service(tmp_path, n=nodes)
    quarantined = []
    service.registry.quarantine = lambda node_id, reason: quarantined.append((node_id, reason)) or True
    _pending(service, "j", SPEC.replace(num_stages=stages, num_replicas=2))
    service.tick()
    job = service.store.get("j")
    at = {(a["stage"], a["replica"]): a for a in job.assignments}
    t, x = at[(0, 0)], at[(0, 1)]  # (0, 1) checks (0, 0)
    service.judge.report("j", job.attempt, t, job.assignments, {"step": 2, "param_digest": "d"})
    service.judge.report("j", job.attempt, x, job.assignments, {"step": 2, "param_digest": "d",
                                                                "checks": [_bad(0, 0, 2)]})
    return service, t, x, quarantined


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spare", [True, False])
def test_a_one_stage_job_leaves_the_accuser_out_when_a_spare_can_check_else_trusts_it(tmp_path, spare):
    service, t, x, quarantined = _accused_in_a_running_job(tmp_path, nodes=3 if spare else 2, stages=1)
    service.tick()
    job = service.store.get("j")
    disputed = [e for e in service.store.events("j") if e["kind"] == "disputed"]
    if spare:  # the spare replaces the accuser and checks t; nobody is quarantined
        assert job.attempt == 2 and quarantined == []
        assert {a["node_id"] for a in job.assignments} == {t["node_id"], "node2"}
        assert disputed[0]["fields"]["accuser_left_out"] is True and "left out of the job" in disputed[0]["message"]
    else:  # nobody else could check t: the one checker's word stands, as before disputes
        assert disputed == [] and [q[0] for q in quarantined] == [t["node_id"]]
        assert "one checker's word" in quarantined[0][1]


@pytest.mark.timeout(10)
def test_a_convicted_node_s_own_accusations_are_void():
    """A corrupting node accuses its honest checker back; once a second checker convicts the
    corrupter, its accusation of the honest node no longer counts towards convicting it."""
    j = Judge()
    asg = _asg([["x", "t"], ["z", "w"]])  # x checks t and t checks x
    assert _accuse(j, 1, asg, "x", "t", 3) == [] and _accuse(j, 1, asg, "t", "x", 3) == []
    assert {(d.accuser, d.target) for d in j.take_disputes("j")} == {("x", "t"), ("t", "x")}
    asg2 = _asg([["x", "z"], ["w", "t"]])  # apart: w checks t, z checks x
    (v,) = _accuse(j, 2, asg2, "w", "t", 5)
    assert v.node_id == "t"
    assert _accuse(j, 2, asg2, "z", "x", 6) == []  # only z's word against x now: a dispute, no verdict
    assert [(d.accuser, d.target) for d in j.take_disputes("j")] == [("z", "x")]
    assert _accuse(j, 2, asg2, "t", "w", 6) == []  # t is convicted: ignored


@pytest.mark.timeout(30)
def test_a_dispute_while_no_plan_is_possible_rolls_back_and_waits_instead_of_trusting_one_checker(tmp_path):
    """Nodes briefly away when a dispute comes: the job rolls back and waits for nodes (as for a
    lost stage), the accused is not quarantined on the one checker's word, and the plan it gets
    once they are back keeps the pair apart."""
    service, t, x, quarantined = _accused_in_a_running_job(tmp_path, nodes=4, stages=2)
    everyone = service.registry.online
    service.registry.online = lambda: [n for n in everyone() if n.id == t["node_id"]]  # the others are away
    service.tick()
    job = service.store.get("j")
    assert quarantined == [] and job.state == "pending" and job.resume_step == 0
    assert "waiting for a node" in job.reason
    (e,) = [e for e in service.store.events("j") if e["kind"] == "disputed"]
    assert e["fields"]["accuser_left_out"] is False and "once enough nodes are online" in e["message"]
    (w,) = [e for e in service.store.events("j") if e["kind"] == "replan" and e["fields"].get("waiting")]
    assert w["fields"]["cause"] == "disputed_check"
    service.registry.online = everyone  # back: re-planned with the pair on different stages
    service.tick()
    job = service.store.get("j")
    assert job.state == "running" and job.attempt == 2 and quarantined == []
    by = {a["node_id"]: a for a in job.assignments}
    assert by[t["node_id"]]["stage"] != by[x["node_id"]]["stage"]
    from coordinator.jobs import churn
    assert churn.rollback_attempts(service.store.events("j")) == {2: 0}  # a rollback by design


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spare", [True, False])
def test_a_one_stage_job_that_waited_through_a_dispute_parts_the_pair_when_it_resumes(tmp_path, spare):
    """The dispute came while no plan was possible; once nodes are back, the plan it resumes with
    follows the one-stage rules: without the accuser when a spare can check the accused, else the
    accused is quarantined on the one checker's word (and the job plans again without it)."""
    service, t, x, quarantined = _accused_in_a_running_job(tmp_path, nodes=3 if spare else 2, stages=1)
    everyone = service.registry.online
    service.registry.online = lambda: []  # every node away for a moment
    service.tick()
    assert service.store.get("j").state == "pending" and quarantined == []
    service.registry.online = everyone
    service.tick()
    job = service.store.get("j")
    if spare:
        assert job.state == "running" and quarantined == []
        assert {a["node_id"] for a in job.assignments} == {t["node_id"], "node2"}
    else:
        assert job.state == "pending" and [q[0] for q in quarantined] == [t["node_id"]]
        assert "one checker's word" in quarantined[0][1]
