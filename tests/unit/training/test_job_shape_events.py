"""Issue 12 items 1 and 6 without a network: shapes the swarm cannot hold, a job loop that one
bad job cannot block, the job event store, and the follow loop's printer and reconnection."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

from swarm.cli.follow import FollowPrinter, event_line, follow
from swarm.clock import FakeClock
from swarm.errors import InfeasiblePlanError, InvalidRequestError, UnavailableError
from swarm.hardware import HardwareInfo
from swarm.job_detail import EVENT_KINDS, JobDetail
from swarm.job_spec import JobSpec
from swarm.membership import NodeInfo
from swarm.model.config import ModelConfig
from swarm.transport.coordinator_client import JobRecord

from coordinator.jobs.planning import plan_job
from coordinator.jobs.service import JobService
from coordinator.jobs.store import JobStore
from coordinator.store import Database

CFG = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4)
MODEL = CFG.to_hf_config()


def _node(i: int) -> NodeInfo:
    hw = HardwareInfo(device="cpu", device_kind="cpu", device_name="cpu", memory_bytes=1 << 30,
                      memory_free_bytes=1 << 30, cpu_cores=2, ram_bytes=1 << 30, disk_free_bytes=1 << 30,
                      tflops=0.1, tflops_dtype="float32")
    return NodeInfo(id=f"node{i}", name=f"n{i}", state="online", hardware=hw, peer_address=f"127.0.0.1:{9000 + i}",
                    registered_at_s=0, last_seen_at_s=0)


def _plan(spec: JobSpec, n: int):
    nan = np.full((n, n), np.nan)
    return plan_job(spec=spec, config=CFG, nodes=[_node(i) for i in range(n)], delay_s=nan, bandwidth_Bps=nan)


SPEC = JobSpec(batch_size=4, micro_batch_size=2, seq_len=16)


@pytest.mark.parametrize(("stages", "replicas", "flags", "need"), [
    (4, 0, "--stages 4", 4), (0, 4, "--replicas 4", 4), (2, 2, "--stages 2 --replicas 2", 4), (4, 1, "--stages 4 --replicas 1", 4),
])
def test_plan_job_names_the_flag_when_the_swarm_has_too_few_nodes(stages, replicas, flags, need):
    with pytest.raises(InfeasiblePlanError) as e:
        _plan(SPEC.replace(num_stages=stages, num_replicas=replicas), 3)
    msg = str(e.value)
    assert msg.startswith(f"{flags} needs at least {need} nodes but the swarm has 3 idle"), msg
    assert "swarm-node join" in msg and "lower --" in msg


@pytest.mark.parametrize("stages", [5, 7])
def test_plan_job_refuses_more_stages_than_layers(stages):
    with pytest.raises(InvalidRequestError, match=f"--stages {stages} cannot split a model of 4 layers"):
        _plan(SPEC.replace(num_stages=stages), 8)


def test_plan_job_still_trims_to_whole_pipelines():
    jp = _plan(SPEC.replace(num_stages=2), 3)  # 3 nodes, 2 stages: one pipeline, one node idle
    assert (jp.plan.d_pp, jp.plan.d_dp) == (2, 1) and len(jp.assignments) == 2
    jp = _plan(SPEC.replace(num_stages=3), 3)
    assert jp.plan.d_pp == 3


class _Registry:
    def __init__(self, n: int) -> None:
        self.nodes = [_node(i) for i in range(n)]

    def online(self):
        return list(self.nodes)

    def snapshot(self):
        return list(self.nodes)

    def get(self, node_id):
        return next(n for n in self.nodes if n.id == node_id)


class _Network:
    def matrix(self, ids):
        n = len(ids)
        return np.full((n, n), np.nan), np.full((n, n), np.nan)

    def planning_matrix(self, nodes):
        return self.matrix([n.id for n in nodes])


def _service(tmp_path, n: int = 3) -> JobService:
    return JobService(store=JobStore(Database(tmp_path / "db"), FakeClock()), state_dir=tmp_path / "state",
                      registry=_Registry(n), network=_Network(), clock=FakeClock())


def _pending(service: JobService, job_id: str, spec: JobSpec = SPEC) -> None:
    service.store.create(job_id=job_id, spec=spec, model=MODEL, num_samples=16, dataset_key="k", total_steps=4)


def test_submit_refuses_a_shape_the_online_nodes_cannot_hold_and_stores_nothing(tmp_path):
    service = _service(tmp_path)
    with pytest.raises(InvalidRequestError, match=r"--stages 4 needs at least 4 nodes but the swarm has 3 online"):
        service.submit(SPEC.replace(num_stages=4), iter(()))
    with pytest.raises(InvalidRequestError, match="--replicas 4"):
        service.submit(SPEC.replace(num_replicas=4), iter(()))
    assert service.store.list() == []
    assert not (tmp_path / "state" / "jobs").exists() or not any((tmp_path / "state" / "jobs").iterdir())


def test_one_job_whose_planning_raises_does_not_block_the_others(tmp_path, caplog):
    service = _service(tmp_path)
    _pending(service, "bad")
    _pending(service, "good")
    real = service._plan

    def plan(job):
        if job.id == "bad":
            raise IndexError("index 0 is out of bounds")
        return real(job)

    service._plan = plan
    with caplog.at_level(logging.ERROR, logger="coordinator.jobs.service"):
        service.tick()
        service.tick()
    bad, good = service.store.get("bad"), service.store.get("good")
    assert bad.state == "failed" and "IndexError" in bad.reason
    assert good.state == "running"
    assert [e["kind"] for e in service.store.events("bad")] == ["plan_error"]
    assert [e["kind"] for e in service.store.events("good")] == ["planned"]
    assert sum("job loop failed" in r.getMessage() for r in caplog.records) == 1


def test_a_running_job_whose_watch_raises_is_logged_once_and_the_loop_carries_on(tmp_path, caplog):
    service = _service(tmp_path, n=4)
    _pending(service, "a", SPEC.replace(num_stages=2, num_replicas=1))
    _pending(service, "b", SPEC.replace(num_stages=2, num_replicas=1))
    service.tick()
    assert {service.store.get(j).state for j in "ab"} == {"running"}

    def watch(job):
        raise KeyError("stage")

    service._watch = watch
    with caplog.at_level(logging.ERROR, logger="coordinator.jobs.service"):
        for _ in range(3):
            service.tick()
    assert sum("job loop failed" in r.getMessage() for r in caplog.records) == 2  # once per job
    assert {service.store.get(j).state for j in "ab"} == {"running"}


def test_event_store_keeps_order_fields_and_refuses_unknown_kinds(tmp_path):
    service = _service(tmp_path)
    _pending(service, "j")
    store = service.store
    first = store.add_event("j", "submitted", "submitted: 4 steps", total_steps=4)
    store.add_event("j", "node_lost", "node n1 (stage 1, replica 0) is lost", node="n1", stage=1, replica=0)
    store.add_event("j", "replan", "re-planning: resuming from step 3", attempt=2, resume_step=3)
    evs = store.events("j")
    assert [e["kind"] for e in evs] == ["submitted", "node_lost", "replan"]
    assert evs[1]["fields"] == {"node": "n1", "stage": 1, "replica": 0}
    assert [e["kind"] for e in store.events("j", after_seq=first["seq"])] == ["node_lost", "replan"]
    assert store.events("other") == []
    with pytest.raises(InvalidRequestError):
        store.add_event("j", "exploded", "no")
    assert {"replica_dropped", "replica_added", "coordinator_restart"} <= set(EVENT_KINDS)
    # the job JSON lists them, and keeps its other keys
    service.cancel("j")
    detail = service.detail(store.get("j"))
    assert [e["kind"] for e in detail["events"]] == ["submitted", "node_lost", "replan", "cancelled"]
    assert detail["resumed_from"] is None and "last_complete_checkpoint" in detail
    assert JobDetail.from_json(detail).to_json() == detail


def _detail(step, state="running", events=()):
    return {"id": "j", "state": state, "reason": "", "step": step, "total_steps": 10, "loss": 2.0,
            "tokens_per_s": 100.0, "eta_s": 5.0, "events": list(events)}


EV1 = {"seq": 1, "at": 0.0, "kind": "submitted", "message": "submitted: 10 steps", "fields": {}}
EV2 = {"seq": 2, "at": 1.0, "kind": "node_lost", "message": "node abc123 (stage 1, replica 0) is lost", "fields": {}}
EV3 = {"seq": 3, "at": 1.0, "kind": "replan", "message": "re-planning (attempt 2): resuming from step 3",
       "fields": {}}


def test_follow_printer_prints_each_event_once_with_a_mark():
    out = io.StringIO()
    p = FollowPrinter(out, tty=False)
    p.show(_detail(2, events=[EV1]))
    p.show(_detail(2, events=[EV1]))  # nothing new
    p.show(_detail(4, events=[EV1, EV2, EV3]))
    lines = out.getvalue().splitlines()
    assert lines[0] == "* submitted: 10 steps"
    assert lines[1].startswith("[") and "step 3/10" in lines[1]
    assert lines[2:4] == ["! node abc123 (stage 1, replica 0) is lost", "! re-planning (attempt 2): resuming from step 3"]
    assert "step 5/10" in lines[4] and len(lines) == 5
    assert event_line(EV3).startswith("! ")


def test_follow_printer_on_a_terminal_ends_the_bar_line_before_an_event():
    out = io.StringIO()
    p = FollowPrinter(out, tty=True)
    p.show(_detail(2))
    p.show(_detail(3, events=[EV2]))
    p.close()
    text = out.getvalue()
    assert text.startswith("\r[") and "\n! node abc123" in text and text.endswith("\n")


class _FlakyClient:
    """get_job answers from a script: an exception is raised, a detail is returned as a record."""

    def __init__(self, script):
        self.script = list(script)

    def get_job(self, job_id):
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return JobRecord(id="j", state=item["state"], reason="", detail=item)


def test_follow_survives_losing_the_coordinator_and_says_reconnected():
    down = UnavailableError("coordinator at 127.0.0.1:1 is unreachable")
    client = _FlakyClient([_detail(1, events=[EV1]), down, down, down, _detail(5), _detail(9, state="succeeded")])
    out, slept = io.StringIO(), []
    job = follow(client, "j", quiet=False, interval_s=1.0, out=out, sleep=slept.append, clock=lambda: 0.0)
    assert job.state == "succeeded"
    text = out.getvalue()
    assert text.count("lost the coordinator") == 1 and text.count("reconnected") == 1
    assert slept == [1.0, 0.5, 1.0, 2.0, 1.0]  # backoff doubles while it is gone, then the normal interval
    assert text.index("lost the coordinator") < text.index("reconnected") < text.index("step 6/10")


def test_follow_gives_up_after_its_deadline():
    down = UnavailableError("unreachable")
    times = iter([0.0, 5.0, 100.0])
    with pytest.raises(UnavailableError):
        follow(_FlakyClient([down, down, down]), "j", quiet=True, out=io.StringIO(), sleep=lambda s: None,
               clock=lambda: next(times), give_up_s=50.0)
