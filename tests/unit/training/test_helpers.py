"""Helper replicas of the slowest stage (coordinator/jobs/helpers.py): the plan a helper fence
makes, what each worker of it is told, the filtered schedules, the stage choice, and who a spot
check of a shared stage accuses."""

import json
from types import SimpleNamespace

import pytest

from swarm.pipeline import schedule

from coordinator.jobs import churn, helpers
from coordinator.jobs.planning import assignments_from_plan
from coordinator.jobs.servicer import assignment_to_pb
from coordinator.jobs.spotchecks import Judge, verify_plans
from node.training.assignment import Assignment
from tests.unit.training.test_job_shape_events import SPEC, _node


def _plan(layout):
    from swarm.scheduling.plan import Plan, PlanStage

    nodes = {f"node{i}": _node(i) for i in range(10)}
    plan = Plan(stages=tuple(PlanStage(layers=(s, s + 1), devices=tuple(devs)) for s, devs in enumerate(layout)),
                objective="dtfm_comm", cost_s=1.0, dp_s=0.0, pp_s=0.0)
    return assignments_from_plan(plan, nodes), nodes


def _helped(layout, stage, helper_nodes):
    asg, nodes = _plan(layout)
    return helpers.with_helpers(asg, stage=stage, helpers={
        r: {"node_id": n, "address": nodes[n].peer_address} for r, n in enumerate(helper_nodes)}), nodes


def _as_node_sees(a):
    job = SimpleNamespace(id="j", attempt=3, total_steps=10, spec=SPEC.replace(steps=10), model={"n_layer": 4},
                          num_samples=16, dataset_key="k", resume_step=0, fence=None)
    return Assignment.from_pb(assignment_to_pb(job, a))


@pytest.mark.timeout(10)
def test_a_helper_shares_its_pipeline_s_micro_batches_at_the_stage_and_the_neighbours_route_by_index():
    asg, _ = _helped([["node0", "node1"], ["node2", "node3"], ["node4", "node5"]], 1, ["node8", "node9"])
    by = {a["node_id"]: _as_node_sees(a) for a in asg}
    own, helper = by["node2"], by["node8"]  # pipeline 0, stage 1
    assert (own.replica, own.pipeline, own.share_index, own.share_count) == (0, 0, 0, 2)
    assert (helper.replica, helper.pipeline, helper.share_index, helper.share_count) == (2, 0, 1, 2)
    assert by["node9"].pipeline == 1 and by["node9"].replica == 3
    assert [own.owns(m) for m in range(4)] == [True, False, True, False]
    assert [helper.owns(m) for m in range(4)] == [False, True, False, True]
    # both holders have the pipeline's neighbours; the neighbours send micro-batch m to holder m % 2
    assert helper.prev.node_id == "node0" and helper.next.node_id == "node4"
    prev, nxt = by["node0"], by["node4"]
    assert [prev.next_for(m).node_id for m in range(3)] == ["node2", "node8", "node2"]
    assert [nxt.prev_for(m).node_id for m in range(3)] == ["node2", "node8", "node2"]
    assert [by["node1"].next_for(m).node_id for m in range(2)] == ["node3", "node9"]  # pipeline 1's helper
    assert by["node5"].prev_for(1).node_id == "node9"
    # the stage's averaging group: both pipelines' workers and both helpers, in replica order
    assert [p.node_id for p in helper.stage_replicas] == ["node2", "node3", "node8", "node9"]
    assert [p.node_id for p in by["node0"].stage_replicas] == ["node0", "node1"]  # other stages unchanged
    assert [a["node_id"] for a in asg if a["added"]] == ["node8", "node9"]
    # an older coordinator's assignment (no pipeline field): the replica is the pipeline
    plain = {k: v for k, v in asg[0].items() if k not in ("pipeline", "share_index", "share_count")}
    m = assignment_to_pb(SimpleNamespace(id="j", attempt=1, total_steps=10, spec=SPEC.replace(steps=10),
                                         model={}, num_samples=16, dataset_key="k", resume_step=0, fence=None), plain)
    m.has_pipeline = False
    assert Assignment.from_pb(m).pipeline == plain["replica"]


@pytest.mark.timeout(10)
def test_an_assignment_whose_shares_do_not_add_up_is_refused():
    from swarm.errors import InvalidRequestError

    asg, _ = _helped([["node0"], ["node2"]], 1, ["node8"])
    helper = next(a for a in asg if a["node_id"] == "node8")
    for bad in ({"share_index": 0}, {"share_index": 2}, {"replica": 0}, {"pipeline": 1},
                {"share_count": 9, "share_index": 1}):
        with pytest.raises(InvalidRequestError):
            _as_node_sees(dict(helper, **bad))
    with pytest.raises(InvalidRequestError, match="holders"):  # holders that do not start with the neighbour
        prev = next(a for a in asg if a["node_id"] == "node0")
        _as_node_sees(dict(prev, next_holders=[{"node_id": "node7", "address": "x:1"}, prev["next_holders"][1]]))


def _runs(ops_by_worker, stage_of):
    """Run each worker's ops in order, an op only once what it needs is done (push transfers:
    F(s, m) needs F(s-1, m); B(s, m) needs F(s, m) and B(s+1, m)). True when all complete."""
    done, pos = set(), {w: 0 for w in ops_by_worker}
    last = max(stage_of.values())
    progress = True
    while progress:
        progress = False
        for w, ops in ops_by_worker.items():
            if pos[w] == len(ops):
                continue
            op, s = ops[pos[w]], stage_of[w]
            need = [("F", s - 1, op.micro_batch)] if op.kind == "F" and s > 0 else []
            if op.kind == "B":
                need = [("F", s, op.micro_batch)] + ([("B", s + 1, op.micro_batch)] if s < last else [])
            if all(n in done for n in need):
                done.add((op.kind, s, op.micro_batch))
                pos[w] += 1
                progress = True
    return all(pos[w] == len(ops) for w, ops in ops_by_worker.items())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize("shared", [0, 1, 2])
def test_filtered_schedules_of_a_shared_stage_cover_every_micro_batch_and_cannot_deadlock(name, shared):
    stages, M = 3, 6
    workers, stage_of = {}, {}
    for s in range(stages):
        holders = 2 if s == shared else 1
        for h in range(holders):
            ops = [op for op in schedule.build(name, num_micro_batches=M, stage=s, num_stages=stages)
                   if op.micro_batch % holders == h]
            workers[(s, h)], stage_of[(s, h)] = ops, s
    assert _runs(workers, stage_of)
    for s in range(stages):
        got = sorted((op.kind, op.micro_batch) for (ws, _), ops in workers.items() if ws == s for op in ops)
        assert got == sorted((k, m) for k in "FB" for m in range(M))  # each op exactly once


def _rows(compute):
    return [{"stage": s, "replica": r, "step": 5, "compute_s": c} for (s, r), c in compute.items()]


@pytest.mark.timeout(10)
def test_pick_stage_takes_the_slowest_stage_only_at_full_replicas_with_a_helper_per_pipeline():
    asg, _ = _plan([["node0", "node1"], ["node2", "node3"]])
    rows = _rows({(0, 0): 1.0, (0, 1): 1.2, (1, 0): 3.0, (1, 1): 2.8})
    kw = dict(rows=rows, assignments=asg, requested=2, steps_left=50, min_steps_left=10)
    assert helpers.pick_stage(idle=2, **kw) == 1
    assert helpers.pick_stage(idle=1, **kw) is None  # one helper for two pipelines shortens no step
    assert helpers.pick_stage(idle=2, **dict(kw, requested=3)) is None  # below --replicas: a growth instead
    assert helpers.pick_stage(idle=2, **dict(kw, steps_left=5)) is None  # about to end
    assert helpers.pick_stage(idle=2, **dict(kw, rows=rows[:3])) is None  # a worker has not reported
    helped, _ = _helped([["node0", "node1"], ["node2", "node3"]], 1, ["node8", "node9"])
    assert helpers.pick_stage(idle=4, **dict(kw, assignments=helped)) is None  # one helper per pipeline
    one, _ = _plan([["node0", "node1"]])
    assert helpers.pick_stage(idle=4, **dict(kw, assignments=one, rows=_rows({(0, 0): 1.0, (0, 1): 1.0}))) is None


@pytest.mark.timeout(10)
def test_losing_a_helper_breaks_its_pipeline_and_fences_count_it_there():
    asg, _ = _helped([["node0", "node1"], ["node2", "node3"]], 1, ["node8", "node9"])
    assert churn.live_pipelines(asg, {"node8"}) == [1]
    fence = churn.open_fence(attempt=2, assignments=asg, live=[0, 1], lost=[], at_s=0.0)
    assert "1:2" in fence["workers"] and "1:3" in fence["workers"]  # the helpers stop at the switch step too
    shrunk = churn.shrink_fence(fence, asg, {"node9"})
    assert shrunk["live"] == [0] and "1:3" not in shrunk["workers"] and "1:2" in shrunk["workers"]
    # at the helped stage the live pipeline's worker and its helper (replicas 0 and 2 of 0-3) merge
    # at the switch step; the other stage's live pipeline has one worker: nobody to merge with
    assert churn.live_members(shrunk, asg, 1) == [0, 2] and churn.live_members(shrunk, asg, 0) == []


@pytest.mark.timeout(10)
def test_a_one_pipeline_job_that_loses_a_holder_of_a_shared_stage_fences_without_it_instead_of_rolling_back():
    asg, _ = _helped([["node0"], ["node1"]], 1, ["node8"])  # one pipeline; node8 helps node1 at stage 1
    lost = churn.holder_loss(asg, {"node8"})
    assert lost == [{"node": "node8", "stage": 1, "replica": 1, "share_index": 1, "share_count": 2}]
    # the helped worker lost instead: the helper holds the stage's whole state too
    assert churn.holder_loss(asg, {"node1"}) == [{"node": "node1", "stage": 1, "replica": 0, "share_index": 0,
                                                  "share_count": 2}]
    assert churn.holder_loss(asg, {"node1", "node8"}) is None  # the stage lost whole
    assert churn.holder_loss(asg, {"node0"}) is None and churn.holder_loss(asg, {"node0", "node8"}) is None
    assert churn.holder_loss(asg, set()) is None
    two, _ = _helped([["node0", "node1"], ["node2", "node3"]], 1, ["node8", "node9"])
    assert churn.holder_loss(two, {"node8"}) is None  # several pipelines: the helper's pipeline is dropped instead
    fence = churn.open_fence(attempt=2, assignments=asg, live=[0], lost=["node8"], at_s=0.0, dropped=lost)
    assert fence["workers"] == ["0:0", "1:0"] and fence["stage0"] == ["0:0"]  # nobody waits for the lost holder
    assert not churn.fence_all_live(fence)  # the survivors do not wait in a round with it either
    assert churn.shrink_fence(fence, asg, {"node8"}) is fence  # the holder it dropped breaks nothing
    assert churn.shrink_fence(fence, asg, {"node8", "node0"})["live"] == []  # another node lost: nothing live
    assert churn.live_members(fence, asg, 1) == []  # the stage's survivor has nobody to merge with
    f = churn.on_fence_report(fence, stage=1, replica=1, state="fence", step=50)  # the lost holder: ignored
    f = churn.on_fence_report(f, stage=0, replica=0, state="fence", step=42)
    f = churn.on_fence_report(f, stage=1, replica=0, state="fence", step=42)
    assert f["switch_step"] == 42
    # lost the helped worker: stage 0 of the pipeline is whoever of its holders lives
    s0, _ = _helped([["node0"], ["node1"]], 0, ["node8"])
    f0 = churn.open_fence(attempt=2, assignments=s0, live=[0], lost=["node0"], at_s=0.0,
                          dropped=churn.holder_loss(s0, {"node0"}))
    assert f0["workers"] == ["0:1", "1:0"] and f0["stage0"] == ["0:1"]
    # what the workers are told: the lost share, parsed the same on the node side
    a = _as_node_sees(asg[0])
    assert a.fence_dropped == ()
    job = SimpleNamespace(id="j", attempt=2, total_steps=10, spec=SPEC.replace(steps=10), model={"n_layer": 4},
                          num_samples=16, dataset_key="k", resume_step=0, fence=fence, assignments=asg)
    told = Assignment.from_pb(assignment_to_pb(job, asg[0]))
    assert [(d.node_id, d.stage, d.share_index, d.share_count) for d in told.fence_dropped] == [("node8", 1, 1, 2)]
    assert [m for m in range(6) if told.fence_dropped[0].holds(m)] == [1, 3, 5]


@pytest.mark.timeout(10)
def test_a_helper_witnesses_for_its_pipeline_and_a_wrong_micro_batch_of_it_accuses_the_helper():
    asg, _ = _helped([["node0", "node1"], ["node2", "node3"]], 1, ["node8", "node9"])
    plans = {a["node_id"]: v for a, v in zip(asg, verify_plans(asg, prob=0.5, secret=7))}
    assert "check" not in plans["node8"] and [(w["stage"], w["replica"]) for w in plans["node8"]["witness"]] == [(0, 0)]
    assert plans["node8"]["witness"] == plans["node2"]["witness"]
    checker_of_0_0 = next(n for n, v in plans.items() if (v.get("check") or {}).get("replica") == 0
                          and v["check"]["stage"] == 0)
    assert set(plans[checker_of_0_0]["check"]["witness_ids"]) == {"node2", "node8"}  # both hold stage 1 of pipeline 0
    j = Judge()
    at = {a["node_id"]: a for a in asg}
    checker = next(a for a in asg if (plans[a["node_id"]].get("check") or {}).get("stage") == 1
                   and plans[a["node_id"]]["check"]["replica"] == 0)  # checks stage 1 of pipeline 0
    bad = {"stage": 1, "replica": 0, "step": 4, "what": "loss", "match": True, "error": 0.0, "tolerance": 0.1,
           "repeated_match": True}
    # the helper ran micro-batches 1 and 3 of pipeline 0 (its report lists their losses in that order)
    assert j.report("j", 2, at["node8"], asg, {"step": 4, "param_digest": "d", "micro_batch_losses": [2.0, 2.5]}) == []
    assert j.report("j", 2, at["node2"], asg, {"step": 4, "param_digest": "d", "micro_batch_losses": [2.0, 2.0]}) == []
    j.report("j", 2, checker, asg, {"step": 4, "param_digest": "d", "checks": [
        dict(bad, micro_batch=3, value=2.5), dict(bad, micro_batch=2, value=2.0)]})  # both right
    assert j.take_disputes("j") == []
    j.report("j", 2, checker, asg, {"step": 5, "param_digest": "d", "checks": []})
    assert j.report("j", 2, at["node8"], asg, {"step": 5, "param_digest": "d", "micro_batch_losses": [2.0, 9.0]}) == []
    j.report("j", 2, at["node2"], asg, {"step": 5, "param_digest": "d", "micro_batch_losses": [2.0, 2.0]})
    j.report("j", 2, checker, asg, {"step": 5, "param_digest": "d", "checks": [dict(bad, step=5, micro_batch=3,
                                                                                     value=2.4)]})
    (d,) = j.take_disputes("j")
    assert d.target == "node8" and d.accuser == checker["node_id"]
    assert json.dumps(plans)  # JSON-able as stored with the job


@pytest.mark.timeout(10)
def test_helpers_are_added_only_where_halving_the_stage_outweighs_the_all_reduce_they_add(tmp_path):
    from swarm.model.testing import make_tiny_checkpoint

    cfg = make_tiny_checkpoint(tmp_path / "m", num_layers=4, hidden_size=32, with_tokenizer=False)
    parts = [helpers.stage_parameters(cfg, 0, 2, is_first=True, is_last=False),
             helpers.stage_parameters(cfg, 2, 4, is_first=False, is_last=True)]
    tied = cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0  # the last stage's own copy
    assert sum(parts) == cfg.num_parameters() + tied
    assert helpers.allreduce_s(1, 1e9, 1e6) == 0.0
    assert helpers.allreduce_s(2, 1e6, 1e6) == pytest.approx(helpers.ROUND_OVERHEAD_S + 1.0)
    assert helpers.allreduce_s(2, 1e6, float("nan")) == pytest.approx(helpers.ROUND_OVERHEAD_S + 1e6 / 12.5e6)
    kw = dict(step_s=1.0, stage=1, pipelines=1, bandwidth_Bps=1e9)
    # a slow stage 4x the other's compute: halved, the step follows it down; a small gradient
    slow = helpers.predicted_step_s(compute_s={0: 0.2, 1: 0.8}, gradient_bytes=1e6, **kw)
    assert slow == pytest.approx(0.5 + helpers.ROUND_OVERHEAD_S + 1e-3)
    # stages alike: halving one moves no bottleneck, and the round only adds
    assert helpers.predicted_step_s(compute_s={0: 0.5, 1: 0.5}, gradient_bytes=1e6, **kw) > 1.0
    # a big gradient over a slow link costs more than the stage saves
    assert helpers.predicted_step_s(compute_s={0: 0.2, 1: 0.8}, gradient_bytes=4e9,
                                    **dict(kw, bandwidth_Bps=12.5e6)) > 1.0
    # with two pipelines the stage already averages: only the bigger group's extra time counts
    two = helpers.predicted_step_s(compute_s={0: 0.2, 1: 0.8}, gradient_bytes=1e6, **dict(kw, pipelines=2))
    assert two == pytest.approx(0.5 + 2 * 3 / 4 * 1e-3 - 2 * 1 / 2 * 1e-3)
    rows = [{"stage": 0, "replica": 0, "step": 19, "compute_s": 2.0}, {"stage": 1, "replica": 0, "step": 19,
                                                                        "compute_s": 8.0}]
    assert helpers.compute_per_step(rows, resume_step=10) == {0: 0.2, 1: 0.8}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("step_s", [1.0, 0.05])
def test_the_job_loop_opens_a_helper_fence_only_when_its_prediction_pays(tmp_path, step_s):
    """JobService with a running 2 x 1 job and an idle node: helpers at the stage that reports the
    most compute per step when the predicted step is 10% faster (a 1 s step whose stage 1 computes
    0.8 s of it), none when the all-reduce they add would eat the gain (a 0.05 s step)."""
    from tests.unit.training.test_job_shape_events import MODEL, SPEC, _service

    service = _service(tmp_path, n=3)
    service.store.create(job_id="j", spec=SPEC.replace(num_stages=2, num_replicas=1), model=MODEL, num_samples=16,
                         dataset_key="k", total_steps=100)
    service.tick()
    job = service.store.get("j")
    service.store.set_started("j", job.attempt)
    for a in job.assignments:
        for step in range(10):
            service.store.add_progress("j", attempt=job.attempt, stage=a["stage"], replica=a["replica"], step=step,
                                       loss=None, tokens=8, tokens_per_s=1.0, bytes_sent=0, bytes_raw=0, step_s=step_s,
                                       compute_s=(0.8 if a["stage"] == 1 else 0.2) * step_s, wait_s=0.0, comm_s=0.0)
    service.speeds.step_s = lambda job: step_s
    service.speeds.attempt_age_s = lambda job: 60.0
    service._maybe_help(service.store.get("j"))
    fence = service.store.get("j").fence
    if step_s == 0.05:
        assert fence is None
        return
    idle = ({"node0", "node1", "node2"} - {a["node_id"] for a in job.assignments}).pop()
    assert fence["helpers"]["stage"] == 1 and fence["helpers"]["nodes"] == [idle] and not fence["lost"]
    assert fence["helpers"]["predicted_step_s"] < 0.9 * step_s
    jp = service._helped_plan(service.store.get("j"), fence["helpers"])
    helper = next(a for a in jp.assignments if a["node_id"] == idle)
    assert (helper["stage"], helper["replica"], helper["pipeline"], helper["share_index"]) == (1, 1, 0, 1)
    assert helper["added"] and "verify" in helper and "checkpoint_keeper" in helper
    assert jp.plan.to_json() == job.plan  # the plan itself (whole pipelines) is unchanged
