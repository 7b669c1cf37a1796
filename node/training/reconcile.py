"""What the node's training plugin does after each assignment poll: a pure decision.

:func:`reconcile` takes what the coordinator said (:class:`PollView`) and a snapshot of the
local stage workers (:class:`WorkerView`) and returns the actions that bring the workers in line:
:class:`StartWorker`, :class:`StopWorker`, :class:`ForgetWorker`. The plugin's poll loop
(:mod:`node.training`) only carries them out, in order. Workers are keyed by
``(job_id, attempt)``: one worker per job attempt on this node.

The rules, in the order their actions come out:

1. a job the coordinator ended (``cancelled_job_ids``) has all its workers stopped;
2. an assignment without a worker gets one; workers of other attempts of the same job are
   stopped first (the job was re-planned);
3. a worker whose key is no longer assigned is stopped while it runs, and forgotten once it is
   done and its job has no assignment on this node at all (a finished worker of a job that is
   still listed, e.g. waiting for its result, stays known so it is not started again).

A worker already stopping is not told again: stopping is idempotent, so skipping it changes
nothing but keeps an unchanged state free of actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

WorkerKey = tuple[str, int]  # (job_id, attempt)


class Assigned(Protocol):
    """What the decision reads of an assignment (:class:`node.training.assignment.Assignment`);
    it carries the whole object into :class:`StartWorker` for the loop to start."""

    @property
    def job_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def key(self) -> WorkerKey: ...

REASON_CANCELLED = "the coordinator ended the job"
REASON_REPLANNED = "re-planned"
REASON_UNASSIGNED = "no longer assigned (the job ended or was re-planned)"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerView:
    """One local stage worker as the decision sees it."""

    job_id: str
    attempt: int
    done: bool  # its thread finished (the job ended, failed or it was stopped)
    stopping: bool  # a stop was already requested

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("a worker needs a job id")
        if self.attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {self.attempt}")

    @property
    def key(self) -> WorkerKey:
        return (self.job_id, self.attempt)


@dataclass(frozen=True, slots=True, kw_only=True)
class PollView:
    """What one assignment poll said.

    ``unreadable_keys``: ``(job_id, attempt)`` of assignments that failed validation. They start
    nothing, but count as assigned, so a worker already running them is left alone.
    """

    assignments: tuple[Assigned, ...] = ()
    unreadable_keys: frozenset[WorkerKey] = frozenset()
    cancelled_job_ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "assignments", tuple(self.assignments))
        object.__setattr__(self, "unreadable_keys", frozenset(self.unreadable_keys))
        object.__setattr__(self, "cancelled_job_ids", frozenset(self.cancelled_job_ids))

    @property
    def assigned_keys(self) -> frozenset[WorkerKey]:
        return frozenset(a.key for a in self.assignments) | self.unreadable_keys

    @property
    def assigned_job_ids(self) -> frozenset[str]:
        return frozenset(job_id for job_id, _ in self.assigned_keys)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartWorker:
    assignment: Assigned


@dataclass(frozen=True, slots=True, kw_only=True)
class StopWorker:
    key: WorkerKey
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetWorker:
    """Drop a finished worker from the plugin's table."""

    key: WorkerKey


Action = StartWorker | StopWorker | ForgetWorker


def reconcile(poll: PollView, workers: tuple[WorkerView, ...]) -> tuple[Action, ...]:
    """The actions that bring the local workers in line with ``poll`` (rules in the module doc)."""
    actions: list[Action] = []
    known: dict[WorkerKey, WorkerView] = {w.key: w for w in workers}
    stopping = {w.key for w in workers if w.stopping}

    def stop(key: WorkerKey, reason: str) -> None:
        if key not in stopping:
            stopping.add(key)
            actions.append(StopWorker(key=key, reason=reason))

    for w in workers:  # 1. jobs the coordinator ended
        if w.job_id in poll.cancelled_job_ids:
            stop(w.key, REASON_CANCELLED)

    started: set[WorkerKey] = set()
    for a in poll.assignments:  # 2. new assignments
        if a.key in known or a.key in started:
            continue
        for w in workers:  # an older (or newer) attempt of the same job
            if w.job_id == a.job_id and w.attempt != a.attempt:
                stop(w.key, REASON_REPLANNED)
        started.add(a.key)
        actions.append(StartWorker(assignment=a))

    assigned, assigned_jobs = poll.assigned_keys, poll.assigned_job_ids
    for w in workers:  # 3. workers nothing assigns any more
        if w.key in assigned:
            continue
        if not w.done:
            stop(w.key, REASON_UNASSIGNED)
        elif w.job_id not in assigned_jobs:
            actions.append(ForgetWorker(key=w.key))
    return tuple(actions)
