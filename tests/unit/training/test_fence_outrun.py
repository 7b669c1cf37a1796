"""A replica lost in a job's last steps: the surviving pipeline finishes the job before the
coordinator notices the loss (a node is lost only after ``--node-timeout-s`` of silence, and a
survivor whose averaging partner is gone runs on alone). The fence opened then can never reach a
switch step (the survivors ran past the last boundary and exited), so it used to wait out
``FENCE_TIMEOUT_S`` and roll the job back to its last checkpoint, which then failed
(bench/chaos.py --quick, issue 14). The job must succeed with the survivors' final checkpoints,
and every step it ran must count: those only the survivors reported, and those whose reports
a coordinator outage held up behind the final checkpoints that ended the job."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from swarm.model.stage import StageModel
from swarm.proto.v1 import training_pb2 as pb
from swarm.transport.jobs import progress_from_pb

from coordinator.jobs import churn
from coordinator.jobs.fencing import FENCE_TIMEOUT_S
from tests.unit.training.test_job_shape_events import CFG, SPEC, _pending, _service


def _report(service, job, a, state: str, step: int):
    r = progress_from_pb(pb.ProgressReport(job_id=job.id, attempt=job.attempt, stage=a["stage"], replica=a["replica"],
                                           step=step, state=state, tokens=8, step_s=0.1))
    return service.report(a["node_id"], r)


def _final(service, tmp_path, job, a) -> None:
    """The worker's final checkpoint, as the coordinator receives it (weights and optimizer state)."""
    d = tmp_path / f"upload-{a['stage']}-{a['replica']}"
    d.mkdir(parents=True)
    torch.manual_seed(a["stage"])
    stage = StageModel(CFG, a["first_layer"], a["last_layer_excl"], is_first=a["stage"] == 0,
                       is_last=a["stage"] == a["num_stages"] - 1)
    save_file({k: v.contiguous() for k, v in stage.hf_state_dict().items()}, str(d / "weights.safetensors"))
    save_file({"step": torch.zeros(1)}, str(d / "optimizer.safetensors"))
    service.checkpoint_received(job.id, a["node_id"], stage=a["stage"], replica=a["replica"], step=job.total_steps,
                                final=True, directory=d)


class _Registry:
    """Online nodes, some of which the test marks lost."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def online(self):
        return [n for n in self.nodes if n.state == "online"]

    def snapshot(self):
        return list(self.nodes)

    def get(self, node_id):
        return next(n for n in self.nodes if n.id == node_id)

    def lose(self, node_id):
        self.nodes = [replace(n, state="lost") if n.id == node_id else n for n in self.nodes]


def _running_2x2(tmp_path):
    service = _service(tmp_path, n=4)
    service.registry = _Registry(service.registry.nodes)
    _pending(service, "j1", SPEC.replace(num_stages=2, num_replicas=2, batch_size=4, micro_batch_size=2))
    service.tick()
    job = service.store.get("j1")
    for a in job.assignments:
        _report(service, job, a, "ready", 0)
    for step in range(job.total_steps - 1):
        for a in job.assignments:
            assert not _report(service, job, a, "running", step).stop
    return service, service.store.get("j1")


@pytest.mark.timeout(30)
def test_survivors_that_finished_before_the_loss_was_noticed_finish_the_job(tmp_path):
    service, job = _running_2x2(tmp_path)
    dead = next(a for a in job.assignments if (a["stage"], a["replica"]) == (0, 0))
    survivors = [a for a in job.assignments if a["replica"] == 1]
    # replica 0's stage 0 dies in the last step; replica 1 runs it alone and ends (final checkpoint, done)
    for a in survivors:
        _report(service, job, a, "running", job.total_steps - 1)
        _final(service, tmp_path, job, a)
        assert not _report(service, job, a, "done", -1).stop
    service.tick()
    assert service.store.get("j1").state == "running"  # replica 0's stage 1 has no final: not done yet
    service.registry.lose(dead["node_id"])  # --node-timeout-s later
    service.tick()
    assert service.store.get("j1").fence is not None  # replica 0 is dropped
    service.tick()
    service.clock.advance(FENCE_TIMEOUT_S + 1)
    service.tick()
    job = service.store.get("j1")
    kinds = [e["kind"] for e in service.store.events("j1")]
    assert job.state == "succeeded", (job.state, job.reason, kinds)
    assert job.attempt == 1 and "replan" not in kinds  # nothing rolled back, nothing done twice
    assert service.store.repeated_steps("j1") == []
    assert service.result_files("j1")  # the model assembled from replica 1's final checkpoints


@pytest.mark.timeout(30)
def test_a_fence_whose_survivors_have_not_finished_still_waits_for_the_switch_step(tmp_path):
    service, job = _running_2x2(tmp_path)
    dead = next(a for a in job.assignments if (a["stage"], a["replica"]) == (1, 0))
    survivors = [a for a in job.assignments if a["replica"] == 1]
    _final(service, tmp_path, job, survivors[1])  # stage 1 of the survivors done, stage 0 not
    service.registry.lose(dead["node_id"])
    service.tick()
    service.tick()
    job = service.store.get("j1")
    assert job.state == "running" and job.fence is not None and job.attempt == 1


def test_fence_outrun_rule():
    job_assignments = [{"stage": s, "replica": r, "node_id": f"n{s}{r}"} for s in range(2) for r in range(2)]
    fence = churn.open_fence(attempt=1, assignments=job_assignments, live=[1], lost=["n00"], at_s=0.0)
    assert not churn.fence_outrun(fence, finals=set())
    assert not churn.fence_outrun(fence, finals={"0:1"})
    assert not churn.fence_outrun(fence, finals={"0:0", "1:0"})  # the dropped pipeline's finals do not count
    assert churn.fence_outrun(fence, finals={"0:1", "1:1", "1:0"})
    assert not churn.fence_outrun({**fence, "workers": []}, finals={"0:1", "1:1"})


@pytest.mark.timeout(30)
def test_every_step_counts_when_the_dead_replica_did_not_report_the_last_ones(tmp_path):
    service, job = _running_2x2(tmp_path)
    dead = next(a for a in job.assignments if (a["stage"], a["replica"]) == (0, 0))
    last = job.total_steps - 1
    for a in job.assignments:
        if a["replica"] == 1:
            _report(service, job, a, "running", last)
            _final(service, tmp_path, job, a)
    service.registry.lose(dead["node_id"])
    for _ in range(3):
        service.tick()
    job = service.store.get("j1")
    assert job.state == "succeeded"
    steps = [h["step"] for h in service.detail(job)["progress"]]
    assert steps == list(range(job.total_steps))  # the last step, run by replica 1 alone, is committed


@pytest.mark.timeout(30)
def test_a_report_held_up_behind_the_final_checkpoints_still_counts(tmp_path):
    service, job = _running_2x2(tmp_path)
    last = job.total_steps - 1
    late = [a for a in job.assignments if a["stage"] == 0]  # their reporters are behind (a coordinator outage)
    for a in job.assignments:
        if a not in late:
            _report(service, job, a, "running", last)
        _final(service, tmp_path, job, a)  # checkpoints go through their own channel
    service.tick()
    assert service.store.get("j1").state == "succeeded"
    assert [h["step"] for h in service.detail(service.store.get("j1"))["progress"]] == list(range(last))
    # the last report, re-sent once the coordinator is back: answered stop (the job is over), but kept
    assert _report(service, job, late[0], "running", last).stop
    assert [h["step"] for h in service.detail(service.store.get("j1"))["progress"]] == list(range(job.total_steps))


@pytest.mark.timeout(30)
def test_a_rollback_forgets_the_final_checkpoints_of_the_attempt_it_throws_away(tmp_path):
    """No replicas: stage 1 got to the end and sent its final checkpoint, stage 0's node died
    before sending its own. The re-plan resumes from the last complete checkpoint; the new
    attempt's stage 0 final alone must not finish the job with the old attempt's stage 1."""
    service = _service(tmp_path, n=3)
    service.registry = _Registry(service.registry.nodes)
    _pending(service, "j1", SPEC.replace(num_stages=2, num_replicas=1, batch_size=4, micro_batch_size=2))
    service.tick()
    job = service.store.get("j1")
    for a in job.assignments:
        _report(service, job, a, "ready", 0)
    s0, s1 = sorted(job.assignments, key=lambda a: a["stage"])
    _final(service, tmp_path / "a1", job, s1)
    service.registry.lose(s0["node_id"])
    service.tick()
    job = service.store.get("j1")
    assert job.state == "running" and job.attempt == 2 and job.resume_step == 0  # rolled back
    assert not [c for c in service.store.checkpoints("j1") if c["final"]]
    new0 = next(a for a in job.assignments if a["stage"] == 0)
    _final(service, tmp_path / "a2", job, new0)
    service.tick()
    assert service.store.get("j1").state == "running"  # waits for the new attempt's stage 1


@pytest.mark.timeout(30)
def test_a_fence_report_of_an_attempt_that_ended_meanwhile_changes_no_fence(tmp_path):
    """report() checks the attempt before it takes the fence lock; a fence that completes meanwhile
    (under that lock) re-plans the job. The late report's boundary must not become the switch step
    of the new attempt's fence: that would stop it below its resume step and redo the steps between."""
    service, stale = _running_2x2(tmp_path)
    stage0 = next(a for a in stale.assignments if (a["stage"], a["replica"]) == (0, 1))
    job = service.store.replan("j1", plan=stale.plan, assignments=stale.assignments, attempt=2, resume_step=5,
                               expect_attempt=1, reason="a fence completed")
    fence = churn.open_fence(attempt=2, assignments=job.assignments, live=[0, 1], lost=[], at_s=0.0, grow_to=2)
    assert service.store.set_fence("j1", fence, expect_attempt=2)
    r = progress_from_pb(pb.ProgressReport(job_id="j1", attempt=1, stage=0, replica=1, step=3, state="fence"))
    ack = service._on_fence_report(stale, stage0, r)
    assert ack.stop and not ack.switch_step
    assert service.store.get("j1").fence == fence  # no boundary, no switch step from attempt 1
