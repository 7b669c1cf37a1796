"""A stage waiting for an input during a fence asks the coordinator for the switch step instead of
waiting out its peer timeout (node/training/membership.py ``while_waiting``). No network: a fake
client answers ReportProgress."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from node.training.membership import FenceReached, Membership
from swarm.errors import UnavailableError
from swarm.proto.v1 import training_pb2 as pb

pytestmark = pytest.mark.timeout(30)


class FakeClient:
    def __init__(self, answers):
        self.answers = list(answers)
        self.reports: list[pb.ProgressReport] = []

    def report(self, req):
        self.reports.append(req)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _membership(client) -> Membership:
    a = SimpleNamespace(job_id="j", attempt=2, stage=1, replica=0, is_first=False)
    return Membership(client, a, stop=threading.Event())


def test_a_waiting_stage_learns_the_switch_step_by_asking():
    client = FakeClient([pb.ProgressAck(fence=True, switch_step=0), pb.ProgressAck(fence=True, switch_step=9)])
    m = _membership(client)
    m.while_waiting(9)  # no fence known: nothing asked
    assert client.reports == []
    m.on_fence(0)  # a reply said "fence", without the switch step yet
    m.while_waiting(9)
    assert [(r.state, r.step, r.attempt) for r in client.reports] == [("fence", 9, 2)]
    m.while_waiting(9)  # asked less than SWITCH_POLL_S ago: not again
    assert len(client.reports) == 1
    m._last_switch_poll -= 10.0
    with pytest.raises(FenceReached):  # the answer names step 9: stop here
        m.while_waiting(9)
    assert m.switch_step == 9


def test_a_stage_0_never_asks_from_inside_a_step():
    """Its "fence" report names its boundary and sets the switch step: asked while it waits for a
    gradient of step 9, it would make 9 the switch step although it finishes step 9 (done twice)."""
    client = FakeClient([])
    a = SimpleNamespace(job_id="j", attempt=2, stage=0, replica=0, is_first=True)
    m = Membership(client, a, stop=threading.Event())
    m.on_fence(0)
    m.while_waiting(9)
    assert client.reports == []


def test_a_failed_poll_changes_nothing():
    m = _membership(FakeClient([UnavailableError("coordinator restarting")]))
    m.on_fence(0)
    m.while_waiting(4)  # no exception: the worker keeps waiting for its input
    assert m.switch_step == 0 and m.fence_pending.is_set()


def test_through_a_fence_that_lost_no_node_replicas_keep_averaging_and_report_the_next_boundary_first():
    from coordinator.jobs import churn

    asg = [{"node_id": f"n{s}{r}", "stage": s, "replica": r} for s in range(2) for r in range(2)]
    grow = churn.open_fence(attempt=2, assignments=asg, live=[0, 1], lost=[], at_s=0.0, grow_to=3)
    assert churn.fence_all_live(grow) and not churn.fence_all_live(None)
    assert not churn.fence_all_live(churn.shrink_fence(grow, asg, {"n11"}))  # a node lost meanwhile
    client = FakeClient([pb.ProgressAck(fence=True, switch_step=0, fence_all_live=True)])
    m = _membership(client)
    m.before_round(4)  # no fence: nothing reported
    assert client.reports == [] and not m.alone
    m.on_fence(0, all_live=True)
    m.before_round(4)  # the boundary after step 4, before waiting in its averaging round
    assert [(r.state, r.step) for r in client.reports] == [("fence", 5)] and not m.alone
    m.on_fence(0, all_live=False, live_members=(0, 2))  # the fence lost a node: each pipeline alone from now on
    m.on_fence(0, all_live=True)
    assert m.alone and m.live_members == (0, 2)  # ... for good; who merges at the switch step
    m.on_ack(pb.ProgressAck(fence=True, switch_step=9, fence_live_members=[0]))  # the live set shrank
    assert m.live_members == (0,) and m.switch_step == 9
    m.before_round(5)
    assert len(client.reports) == 1  # nothing more: no round to wait in


def test_a_holder_loss_fence_dooms_the_lost_holders_micro_batches_and_malformed_shares_are_left_out():
    client = FakeClient([pb.ProgressAck(fence=True, switch_step=0, fence_dropped=[
        pb.DroppedShare(node_id="helper", stage=1, share_index=1, share_count=2),
        pb.DroppedShare(node_id="bad", stage=1, share_index=2, share_count=2),  # index past the count
        pb.DroppedShare(node_id="bad", stage=1, share_index=0, share_count=1),  # an unshared stage
        pb.DroppedShare(node_id="", stage=1, share_index=0, share_count=2)])])  # no node
    m = _membership(client)
    assert not m.doomed(1) and m.gone == frozenset()
    m.on_ack(client.report(None))
    assert m.alone and m.gone == {"helper"}
    assert [mb for mb in range(6) if m.doomed(mb)] == [1, 3, 5]
    m.on_fence(0, all_live=False)  # a reply without the shares forgets nothing in this attempt
    assert m.doomed(3) and m.gone == {"helper"}
