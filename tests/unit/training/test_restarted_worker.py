"""A node killed and started again before the coordinator noticed it was gone: its new process
sets the worker of the running attempt up again (``ready``) after that worker had run steps.
The coordinator treats the node as lost for the job (its worker's state is gone) instead of
waiting for its neighbours to blame it as a staller; the surviving replica carries on."""

import pytest

from swarm.proto.v1 import training_pb2 as pb
from swarm.transport.jobs import progress_from_pb

from tests.unit.training.test_job_shape_events import SPEC, _pending, _service


def _report(service, job, a, state: str, step: int):
    r = progress_from_pb(pb.ProgressReport(job_id=job.id, attempt=job.attempt, stage=a["stage"], replica=a["replica"],
                                           step=step, state=state, tokens=8, step_s=0.1))
    return service.report(a["node_id"], r)


@pytest.mark.timeout(20)
def test_a_worker_set_up_again_after_running_steps_drops_its_replica(tmp_path):
    service = _service(tmp_path, n=4)
    _pending(service, "j1", SPEC.replace(num_stages=2, num_replicas=2, batch_size=4, micro_batch_size=2))
    service.tick()
    job = service.store.get("j1")
    assert job.state == "running" and len(job.assignments) == 4
    acks = [_report(service, job, a, "ready", 0) for a in job.assignments]
    assert acks[-1].start  # the start fence passed
    job = service.store.get("j1")
    for a in job.assignments:
        assert not _report(service, job, a, "running", 0).stop
    victim = next(a for a in job.assignments if (a["stage"], a["replica"]) == (1, 1))
    # the victim's node restarted: its new worker sets up and reports ready again
    ack = _report(service, job, victim, "ready", 0)
    assert ack.stop and "restarted" in ack.reason
    service.tick()
    kinds = [(e["kind"], e["fields"].get("state")) for e in service.store.events("j1")]
    assert ("node_lost", "restarted") in kinds and ("replica_dropped", None) in kinds
    assert service.store.get("j1").fence["live"] == [0]  # the other pipeline carries on, no rollback


@pytest.mark.timeout(20)
def test_a_late_ready_of_a_worker_that_ran_no_step_is_not_a_restart(tmp_path):
    service = _service(tmp_path, n=4)
    _pending(service, "j1", SPEC.replace(num_stages=2, num_replicas=2, batch_size=4, micro_batch_size=2))
    service.tick()
    job = service.store.get("j1")
    for a in job.assignments:
        _report(service, job, a, "ready", 0)
    job = service.store.get("j1")
    a = job.assignments[0]
    assert _report(service, job, a, "ready", 0).start  # e.g. its ready was re-sent after an outage
    service.tick()
    assert service.store.get("j1").fence is None


@pytest.mark.timeout(20)
def test_a_replica_lost_before_its_attempt_started_replans_at_once(tmp_path):
    """Not a replica-loss fence: the live workers wait for `start` and would never reach a step
    boundary (bench/chaos.py: 60 s without a commit until the fence timed out)."""
    service = _service(tmp_path, n=4)
    _pending(service, "j1", SPEC.replace(num_stages=2, num_replicas=2, batch_size=4, micro_batch_size=2))
    service.tick()
    job = service.store.get("j1")
    victim = next(a for a in job.assignments if (a["stage"], a["replica"]) == (1, 1))
    for a in job.assignments:
        if a is not victim:
            assert not _report(service, job, a, "ready", 0).start  # the start fence waits for the victim
    service._on_lost(service.store.get("j1"), {victim["node_id"]: "lost"})
    job = service.store.get("j1")
    kinds = [e["kind"] for e in service.store.events("j1")]
    assert job.fence is None and "replica_dropped" not in kinds and "node_lost" in kinds
    assert job.attempt == 2 or job.state == "pending", (job.attempt, job.state, kinds)
