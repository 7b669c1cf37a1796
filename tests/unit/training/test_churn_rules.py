"""Churn rules without a network: the fences' pure decisions, the registry's restart grace, and
stale or early tensors at a node's endpoint."""

import pytest
import torch

from swarm.clock import FakeClock
from swarm.errors import UnavailableError
from swarm.transport import tensors as wt

from coordinator.jobs import churn
from coordinator.registry import NodeRegistry
from coordinator.store import Database
from node.training.exchange import Endpoint, StaleTensor
from tests.unit.foundation.test_node_registry import HW


def _assignments(stages: int, replicas: int) -> list[dict]:
    return [{"node_id": f"n{s}{r}", "stage": s, "replica": r, "num_replicas": replicas}
            for s in range(stages) for r in range(replicas)]


@pytest.mark.timeout(10)
def test_start_fence_needs_every_worker_of_the_attempt():
    a = _assignments(2, 1)
    assert not churn.all_ready(a, {"0:0"})
    assert churn.all_ready(a, {"0:0", "1:0"})
    assert not churn.all_ready([], set())


@pytest.mark.timeout(10)
def test_replica_fence_switches_at_the_furthest_stage0_and_completes_when_all_fenced():
    a = _assignments(3, 3)
    assert churn.live_pipelines(a, {"n11"}) == [0, 2]
    f = churn.open_fence(attempt=4, assignments=a, live=[0, 2], lost=["n11"], at_s=1.0)
    assert f["workers"] == ["0:0", "0:2", "1:0", "1:2", "2:0", "2:2"] and f["stage0"] == ["0:0", "0:2"]
    f = churn.on_fence_report(f, stage=1, replica=1, state="fence", step=9)  # a dropped worker: ignored
    assert f["ready"] == {}
    f = churn.on_fence_report(f, stage=0, replica=0, state="fence", step=7)
    f = churn.on_fence_report(f, stage=2, replica=2, state="fence", step=6)
    assert f["switch_step"] == 0  # stage 0 of pipeline 2 has not reported
    f = churn.on_fence_report(f, stage=0, replica=2, state="fence", step=8)
    assert f["switch_step"] == 0  # every stage 0 reported, but not every live worker (1:0, 1:2, 2:0)
    for s, r in [(1, 0), (1, 2), (2, 0)]:
        f = churn.on_fence_report(f, stage=s, replica=r, state="fence", step=7)
    assert f["switch_step"] == 8
    for k in f["workers"]:
        s, r = map(int, k.split(":"))
        assert not churn.fence_complete(f)
        f = churn.on_fence_report(f, stage=s, replica=r, state="fenced", step=8 if k != "2:2" else 7)
    assert not churn.fence_complete(f)  # fenced at the wrong step does not count
    f = churn.on_fence_report(f, stage=2, replica=2, state="fenced", step=8)
    assert churn.fence_complete(f)
    # losing a live pipeline during the fence shrinks it
    g = churn.shrink_fence(f, a, {"n11", "n02"})
    assert g["live"] == [0] and "0:2" not in g["workers"] and "n02" in g["lost"]


@pytest.mark.timeout(10)
def test_the_live_members_of_a_stage_merge_at_the_switch_step_by_their_averaging_positions():
    a = _assignments(2, 4)
    lost = churn.open_fence(attempt=3, assignments=a, live=[0, 2, 3], lost=["n11"], at_s=0.0)
    # positions in each stage's replica order (the rendezvous'), the same at every stage
    assert churn.live_members(lost, a, 0) == [0, 2, 3] and churn.live_members(lost, a, 1) == [0, 2, 3]
    # replica order, not the list's: the coordinator may store a stage's workers in any order
    assert churn.live_members(lost, list(reversed(a)), 1) == [0, 2, 3]
    shrunk = churn.shrink_fence(lost, a, {"n11", "n03"})  # a survivor lost during the fence
    assert churn.live_members(shrunk, a, 0) == [0, 2]
    # one survivor left, a fence that lost no node, no fence: nobody to merge with
    assert churn.live_members(churn.shrink_fence(shrunk, a, {"n10"}), a, 0) == []
    assert churn.live_members(churn.open_fence(attempt=3, assignments=a, live=[0, 1, 2, 3], lost=[], at_s=0.0,
                                               grow_to=5), a, 0) == []
    assert churn.live_members(None, a, 0) == []
    two = _assignments(1, 2)  # two replicas, one lost: the survivor has nobody to merge with
    assert churn.live_members(churn.open_fence(attempt=1, assignments=two, live=[1], lost=["n00"], at_s=0.0),
                              two, 0) == []


@pytest.mark.timeout(10)
def test_replica_counts_keep_the_batch_in_whole_micro_batches():
    assert churn.replica_counts(4, 8, 2) == [4, 2, 1]
    assert churn.replica_counts(3, 12, 2) == [3, 2, 1]
    assert churn.replica_counts(2, 4, 4) == [1]


@pytest.mark.timeout(10)
def test_growth_target_adds_whole_pipelines_that_split_the_batch():
    kw = dict(batch_size=8, micro_batch_size=2)
    # running 1 of 4 requested pipelines of 3 stages
    assert churn.growth_target(current=1, requested=4, stages=3, idle_nodes=2, **kw) is None  # not one pipeline
    assert churn.growth_target(current=1, requested=4, stages=3, idle_nodes=3, **kw) == 2
    assert churn.growth_target(current=1, requested=4, stages=3, idle_nodes=8, **kw) == 2  # 3 does not split 8
    assert churn.growth_target(current=1, requested=4, stages=3, idle_nodes=9, **kw) == 4
    assert churn.growth_target(current=2, requested=2, stages=3, idle_nodes=9, **kw) is None  # already there
    assert churn.growth_target(current=1, requested=0, stages=3, idle_nodes=9, **kw) is None  # planner's choice
    f = churn.open_fence(attempt=2, assignments=_assignments(3, 1), live=[0], lost=[], at_s=1.0, grow_to=2)
    assert f["grow_to"] == 2 and f["lost"] == [] and f["workers"] == ["0:0", "1:0", "2:0"]


@pytest.mark.timeout(10)
def test_registry_grace_after_a_restart_then_lost(tmp_path):
    clock = FakeClock()
    hw = HW
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    reg.register(node_id="a" * 32, name="a", public_key=b"k", peer_address="127.0.0.1:1", hardware=hw)
    reg.close()
    clock.advance(100.0)  # the coordinator was down for a while
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0, grace_s=18.0)
    reg.begin_grace()
    clock.advance(17.0)
    assert reg.sweep() == [] and reg.get("a" * 32).state == "online"
    clock.advance(2.0)
    assert reg.sweep() == ["a" * 32]
    reg.heartbeat("a" * 32)  # it came back late: online again
    assert reg.get("a" * 32).state == "online"
    reg.close()


@pytest.mark.timeout(10)
def test_a_node_already_silent_when_the_coordinator_stopped_is_restored_lost(tmp_path):
    """Reads showed it lost before any sweep wrote it: it must not come back online for a grace period."""
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    reg.register(node_id="a" * 32, name="a", public_key=b"k", peer_address="127.0.0.1:1", hardware=HW)
    reg.register(node_id="b" * 32, name="b", public_key=b"k", peer_address="127.0.0.1:2", hardware=HW)
    clock.advance(8.0)  # b was killed: only a heartbeats
    reg.heartbeat("a" * 32)
    assert reg.get("b" * 32).state == "lost"  # the old process's view, never swept to SQLite
    reg.close()  # writes the heartbeats held in memory
    clock.advance(30.0)
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0, grace_s=18.0)
    reg.begin_grace()
    assert reg.get("b" * 32).state == "lost" and reg.get("a" * 32).state == "online"
    reg.close()


def _header(attempt: int) -> wt.TensorHeader:
    payload = b"x"
    return wt.make_header(payload, job_id="j", step=0, micro_batch=0, sample_ids=(0,), shape=(1,), dtype="float32",
                          codec="none", kind="activation", boundary=0, sender_id="s" * 32, replica=0, attempt=attempt)


@pytest.mark.timeout(10)
def test_endpoint_drops_stragglers_and_defers_newer_attempts():
    ep = Endpoint("j", lambda h, p: torch.zeros(1), attempt=3)
    with pytest.raises(StaleTensor):
        ep.precheck(_header(2))
    assert ep.num_stale == 1 and ep.num_rejected == 0
    with pytest.raises(UnavailableError) as err:
        ep.precheck(_header(4))
    assert err.value.retryable
    ep.precheck(_header(3))
