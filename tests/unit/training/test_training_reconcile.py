"""The node's training decision (node/training/reconcile.py), driven without a network."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from node.training.reconcile import (
    REASON_CANCELLED, REASON_REPLANNED, REASON_UNASSIGNED, ForgetWorker, PollView, StartWorker, StopWorker,
    WorkerView, reconcile,
)


@dataclass(frozen=True, slots=True)
class Assigned:
    """Stands in for node.training.assignment.Assignment: the decision reads only its key."""

    job_id: str
    attempt: int = 0
    stage: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)


def worker(job_id: str, attempt: int = 0, *, done: bool = False, stopping: bool = False) -> WorkerView:
    return WorkerView(job_id=job_id, attempt=attempt, done=done, stopping=stopping)


def test_new_assignment_starts_a_worker() -> None:
    a = Assigned("j1")
    assert reconcile(PollView(assignments=(a,)), ()) == (StartWorker(assignment=a),)


def test_unchanged_state_gives_no_actions() -> None:
    poll = PollView(assignments=(Assigned("j1"), Assigned("j2", 3)))
    assert reconcile(poll, (worker("j1"), worker("j2", 3))) == ()
    assert reconcile(PollView(), ()) == ()
    # a finished worker whose assignment is still listed is neither restarted nor forgotten
    assert reconcile(PollView(assignments=(Assigned("j1"),)), (worker("j1", done=True),)) == ()


def test_job_the_coordinator_ended_is_stopped_once() -> None:
    poll = PollView(cancelled_job_ids=frozenset({"j1"}))
    assert reconcile(poll, (worker("j1"), worker("j2"))) == (
        StopWorker(key=("j1", 0), reason=REASON_CANCELLED),
        StopWorker(key=("j2", 0), reason=REASON_UNASSIGNED),
    )
    # once stopping, it is not told again; the listed job keeps its worker
    poll = PollView(assignments=(Assigned("j2"),), cancelled_job_ids=frozenset({"j1"}))
    assert reconcile(poll, (worker("j1", stopping=True), worker("j2"))) == ()


def test_unassigned_running_worker_is_stopped() -> None:
    assert reconcile(PollView(), (worker("j1"),)) == (StopWorker(key=("j1", 0), reason=REASON_UNASSIGNED),)


def test_finished_worker_is_forgotten() -> None:
    assert reconcile(PollView(), (worker("j1", done=True, stopping=True),)) == (ForgetWorker(key=("j1", 0)),)


def test_replanned_job_restarts_its_worker() -> None:
    new = Assigned("j1", attempt=2, stage=1)
    actions = reconcile(PollView(assignments=(new,)), (worker("j1", 1),))
    assert actions == (StopWorker(key=("j1", 1), reason=REASON_REPLANNED), StartWorker(assignment=new))
    # next poll: the old attempt is done but its job is still listed (new attempt): kept, not forgotten
    assert reconcile(PollView(assignments=(new,)), (worker("j1", 1, done=True, stopping=True), worker("j1", 2))) == ()


def test_unreadable_assignment_keeps_its_worker_and_starts_nothing() -> None:
    poll = PollView(unreadable_keys=frozenset({("j1", 0)}))
    assert reconcile(poll, (worker("j1"),)) == ()
    assert reconcile(poll, ()) == ()


def test_duplicate_assignment_starts_one_worker() -> None:
    a = Assigned("j1")
    assert reconcile(PollView(assignments=(a, a)), ()) == (StartWorker(assignment=a),)


def test_worker_view_is_validated() -> None:
    with pytest.raises(ValueError):
        WorkerView(job_id="", attempt=0, done=False, stopping=False)
    with pytest.raises(ValueError):
        WorkerView(job_id="j", attempt=-1, done=False, stopping=False)
