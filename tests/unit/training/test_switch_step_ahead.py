"""The fence's switch step is never below a live worker's position (coordinator/jobs/churn.py, "Why
every live worker's boundary"): a worker ahead of what the coordinator knows (it trained on
through a coordinator outage; a stage 0 report that raced the fence's opening) raises it, and a
worker past it anyway makes the job fall back at once instead of re-planning from a checkpoint
labelled with a step its weights are past. No network, no sleeps: fake data, a fake client."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from swarm.errors import PeerError
from swarm.proto.v1 import training_pb2 as pb

from coordinator.jobs import churn
from node.training.membership import FenceReached, Membership
from tests.unit.training.test_fence_outrun import _report, _running_2x2

pytestmark = pytest.mark.timeout(30)


def _assignments(stages: int, replicas: int) -> list[dict]:
    return [{"node_id": f"n{s}{r}", "stage": s, "replica": r, "num_replicas": replicas}
            for s in range(stages) for r in range(replicas)]


def _fence(stages: int = 2, live: tuple[int, ...] = (0, 1)) -> dict:
    return churn.open_fence(attempt=3, assignments=_assignments(stages, 2), live=list(live), lost=[], at_s=0.0)


def test_the_switch_step_waits_for_every_live_worker_and_is_the_furthest():
    # after a coordinator restart its picture lags: both stage 0s report boundary 50, while stage 1
    # of pipeline 1 (its report held up, or it ran on through the outage) stands at 57
    f = _fence()
    for k, step in [("0:0", 50), ("0:1", 50), ("1:0", 49)]:
        s, r = map(int, k.split(":"))
        f = churn.on_fence_report(f, stage=s, replica=r, state="fence", step=step)
        assert f["switch_step"] == 0, k
    f = churn.on_fence_report(f, stage=1, replica=1, state="fence", step=57)
    assert f["switch_step"] == 57  # stage 0 alone would have said 50: steps 50-56 done twice
    assert not churn.fence_overrun(f)


def test_the_switch_step_is_the_stage_0s_when_nobody_is_ahead():
    f = _fence(stages=3)
    for k, step in [("0:0", 12), ("0:1", 11), ("1:0", 12), ("1:1", 11), ("2:0", 11), ("2:1", 11)]:
        s, r = map(int, k.split(":"))
        f = churn.on_fence_report(f, stage=s, replica=r, state="fence", step=step)
    assert f["switch_step"] == 12


def test_a_dropped_pipelines_workers_are_not_waited_for():
    f = _fence(live=(0,))
    f = churn.on_fence_report(f, stage=1, replica=1, state="fence", step=99)  # dropped: ignored
    f = churn.on_fence_report(f, stage=0, replica=0, state="fence", step=20)
    f = churn.on_fence_report(f, stage=1, replica=0, state="fence", step=20)
    assert f["switch_step"] == 20 and "1:1" not in f["ready"]


def test_a_boundary_past_the_switch_step_marks_the_fence_overrun():
    f = _fence(live=(0,))
    f = churn.on_fence_report(f, stage=0, replica=0, state="fence", step=20)
    f = churn.on_fence_report(f, stage=1, replica=0, state="fence", step=20)
    assert not churn.fence_overrun(churn.on_fence_report(f, stage=1, replica=0, state="fence", step=20))
    g = churn.on_fence_report(f, stage=1, replica=0, state="fence", step=23)
    assert churn.fence_overrun(g) and g["overrun"] == ["1:0"] and g["switch_step"] == 20
    assert not churn.fence_complete(churn.on_fence_report(g, stage=1, replica=0, state="fenced", step=23))


def test_the_coordinator_falls_back_at_once_when_a_worker_reports_past_the_switch_step(tmp_path):
    service, job = _running_2x2(tmp_path)
    fence = churn.open_fence(attempt=job.attempt, assignments=job.assignments, live=[0, 1], lost=[], at_s=0.0)
    assert service.store.set_fence("j1", fence, expect_attempt=job.attempt)
    by_key = {(a["stage"], a["replica"]): a for a in job.assignments}
    for k in [(0, 0), (0, 1), (1, 0)]:
        assert _report(service, job, by_key[k], "fence", 5).switch_step == 0
    assert _report(service, job, by_key[(1, 1)], "fence", 5).switch_step == 5
    _report(service, job, by_key[(1, 1)], "fence", 6)  # should not happen: past the switch step
    after = service.store.get("j1")
    assert after.attempt == job.attempt + 1 and after.fence is None
    replan = [e for e in service.store.events("j1") if e["kind"] == "replan"][-1]
    assert replan["fields"]["cause"] == "fence_overrun" and not replan["fields"].get("fence")
    assert churn.rollback_attempts(service.store.events("j1")) == {}  # not a rollback by design


class _NoWait(threading.Event):
    """A stop event whose waits return at once (the test drives the loop through the client)."""

    def wait(self, timeout=None):
        return self.is_set()


class _Client:
    def __init__(self, answers):
        self.answers = list(answers)
        self.reports: list[tuple[str, int]] = []

    def report(self, req):
        self.reports.append((req.state, req.step))
        return self.answers.pop(0)


def test_a_worker_past_the_switch_step_neither_stops_there_nor_runs_on():
    """It reports its boundary until the coordinator's re-plan stops the attempt: no checkpoint
    labelled 7 over weights at 9, no step 9 run (the re-plan would do it again)."""
    client = _Client([pb.ProgressAck(fence=True, switch_step=7), pb.ProgressAck(fence=True, switch_step=7),
                      pb.ProgressAck(stop=True, reason="stale attempt 2 (job is at attempt 3)")])
    a = SimpleNamespace(job_id="j", attempt=2, stage=0, replica=0, is_first=True)
    stop = _NoWait()
    m = Membership(client, a, stop=stop)
    m.on_fence(0)
    with pytest.raises(PeerError, match="stopped by the coordinator"):
        m.at_boundary(9)
    assert stop.is_set()  # the worker exits quietly: a stop, not a failure to report
    assert client.reports == [("fence", 9)] * 3


def test_a_worker_at_the_switch_step_stops_there():
    client = _Client([pb.ProgressAck(fence=True, switch_step=7)])
    a = SimpleNamespace(job_id="j", attempt=2, stage=0, replica=0, is_first=True)
    m = Membership(client, a, stop=_NoWait())
    m.on_fence(0)
    with pytest.raises(FenceReached):
        m.at_boundary(7)


def test_a_stage_waiting_past_the_switch_step_says_so_and_does_not_stop_there():
    client = _Client([pb.ProgressAck(fence=True, switch_step=7)])
    a = SimpleNamespace(job_id="j", attempt=2, stage=1, replica=0, is_first=False)
    m = Membership(client, a, stop=_NoWait())
    m.on_fence(7)
    m.while_waiting(6)  # before the switch step: carries on, nothing asked
    m.while_waiting(8)  # past it: reports its boundary (the coordinator falls back), no FenceReached
    assert client.reports == [("fence", 8)]
    with pytest.raises(FenceReached):
        m.while_waiting(7)
