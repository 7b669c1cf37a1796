"""A stage worker's side of the coordinator's fences (coordinator/jobs/churn.py states the protocol).

:class:`Membership` talks to the coordinator through ``ReportProgress`` with three states:

- ``ready`` (step = the first step): the worker has set up its stage; :meth:`await_start`
  repeats it until the reply says ``start`` (every worker of the attempt is ready), so no
  tensor of a new attempt reaches a neighbour still on the old one;
- ``fence`` (step = the boundary the worker stands at, before starting that step): sent once a
  reply said ``fence``; the replies carry the switch step when the coordinator knows it;
- ``fenced`` (step = the switch step): sent after the worker stopped there and uploaded its
  checkpoint; the coordinator then re-plans the job from that step.

Every call tolerates a coordinator outage shorter than ``outage_s`` (the coordinator may be
restarting: calls are retried with backoff); longer outages raise the last error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from swarm.errors import AuthError, PeerError, SwarmError
from swarm.proto.v1 import training_pb2 as pb

from node.training.assignment import dropped_from_pb

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.2  # how often a waiting worker asks again
SWITCH_POLL_S = 1.0  # how often a worker waiting for an input during a fence asks for the switch step
DEFAULT_OUTAGE_S = 300.0  # how long a worker keeps training without the coordinator


def is_outage(exc: SwarmError) -> bool:
    """True when retrying a coordinator call can help: it is unreachable (restarting) or no longer
    knows this node's session (restarted; the agent registers again)."""
    return exc.retryable or type(exc) is AuthError


def through_outage(call: Callable[[], T], *, outage_s: float, stop: threading.Event) -> T:
    """``call()``, retried with backoff (up to 2 s) while the coordinator is unreachable or restarting
    (:func:`is_outage`), for up to ``outage_s``. Raises PeerError when stopped or after that, and any
    other SwarmError of the call at once."""
    deadline = time.monotonic() + outage_s
    backoff = POLL_S
    while True:
        if stop.is_set():
            raise PeerError("stopped")
        try:
            return call()
        except SwarmError as exc:
            if not is_outage(exc):
                raise
            if time.monotonic() + backoff > deadline:
                raise PeerError(f"the coordinator was unreachable for {outage_s:.0f} s: {exc}") from exc
            log.debug("coordinator unreachable (%s); retrying", exc)
            stop.wait(backoff)
            backoff = min(2.0, backoff * 2)


class FenceReached(Exception):
    """The worker stands at the switch step of a fence: stop here, checkpoint, report ``fenced``."""


class Membership:
    """Thread-safe. ``on_ack(ack)`` is also called by the progress reporter for every reply."""

    def __init__(self, client, assignment, *, stop: threading.Event, outage_s: float = DEFAULT_OUTAGE_S) -> None:
        self.client = client
        self.a = assignment
        self.stop = stop
        self.outage_s = outage_s
        self.fence_pending = threading.Event()
        self.switch_step = 0
        self._last_switch_poll = 0.0
        self._lost = False  # a reply said the fence lost a node (sticky: it never comes back in this attempt)
        # that fence's live members of this stage, by position in its averaging order (the latest
        # reply's: the live set only shrinks), who merge their parameters at the switch step
        self.live_members: tuple[int, ...] = ()
        # a holder-loss fence's lost holders (assignment.DroppedShare; only grows in an attempt):
        # their micro-batches are dropped from the steps in flight, sends to them skipped
        self.dropped: tuple = ()
        self.gone: frozenset[str] = frozenset()

    def on_ack(self, ack: pb.ProgressAck) -> None:
        if ack.fence:
            self.on_fence(ack.switch_step, all_live=ack.fence_all_live, live_members=tuple(ack.fence_live_members),
                          dropped=dropped_from_pb(ack.fence_dropped))

    @property
    def alone(self) -> bool:
        """Each pipeline steps with its own gradients: a fence that lost a node is pending (its
        averaging groups have a dead member). Through a fence that lost none (a growth, helper or
        re-balance fence) replicas keep averaging: every member runs to the switch step."""
        return self.fence_pending.is_set() and self._lost

    def doomed(self, micro_batch: int) -> bool:
        """A holder-loss fence dropped ``micro_batch`` (a lost holder ran it at its stage): no input
        of it will come, so waiting for one ends (node/training/tensor_io.py)."""
        return any(d.holds(micro_batch) for d in self.dropped)

    def before_round(self, step: int) -> None:
        """Step ``step``'s compute is done and its averaging round starts: during a fence, report
        the next boundary now. A round waits for every member of the stage, and one whose
        pipeline's first stage stands at ``step`` runs it only once the switch step is known,
        which needs this worker's boundary: reported after the round, it would come only when
        the round timed out."""
        if self.fence_pending.is_set() and not self._lost:
            self._report("fence", step + 1)

    def on_fence(self, switch_step: int, *, all_live: bool = False, live_members: tuple[int, ...] = (),
                 dropped: tuple = ()) -> None:
        """The coordinator fences the attempt (a progress reply or an assignment poll said so);
        ``all_live``: it lost no node (False from a coordinator older than that flag);
        ``live_members``: then, who of this stage merges at the switch step (empty: nobody);
        ``dropped``: a holder-loss fence's lost holders (assignment.DroppedShare)."""
        if not all_live:
            self._lost = True
            self.live_members = tuple(int(i) for i in live_members)
            new = tuple(d for d in dropped if d not in self.dropped)
            if new:
                self.dropped += new
                self.gone = frozenset(d.node_id for d in self.dropped)
                log.warning("fence: holder(s) %s of job=%s lost; their micro-batches in flight are dropped",
                            ",".join(f"{d.node_id[:12]} (stage {d.stage}, micro-batches = {d.share_index} mod "
                                     f"{d.share_count})" for d in new), self.a.job_id)
        if not self.fence_pending.is_set():
            log.info("fence: the replicas of job=%s change (one lost or one added); stopping at a step boundary",
                     self.a.job_id)
            self.fence_pending.set()
        if switch_step and not self.switch_step:
            log.info("fence: switch step %d job=%s stage=%d replica=%d", switch_step, self.a.job_id,
                     self.a.stage, self.a.replica)
            self.switch_step = int(switch_step)

    def _request(self, state: str, step: int, **extra) -> pb.ProgressReport:
        a = self.a
        return pb.ProgressReport(job_id=a.job_id, attempt=a.attempt, stage=a.stage, replica=a.replica, step=step,
                                 state=state, **extra)

    def _report(self, state: str, step: int, **extra) -> pb.ProgressAck:
        """One report, retried through a coordinator outage of up to ``outage_s``."""
        ack = through_outage(lambda: self.client.report(self._request(state, step, **extra)),
                             outage_s=self.outage_s, stop=self.stop)
        self.on_ack(ack)
        if ack.stop:
            self.stop.set()
            raise PeerError(f"stopped by the coordinator: {ack.reason}")
        return ack

    def await_start(self, step: int, *, state_from: str = "", state_bytes: int = 0) -> None:
        """Report ``ready`` until every worker of the attempt is (the start fence); the report
        says where the stage's state came from (node/training/state_copy.py)."""
        t0 = time.monotonic()
        while not self._report("ready", step, state_from=state_from, state_bytes=state_bytes).start:
            self.stop.wait(POLL_S)
        log.info("start fence passed job=%s attempt=%d stage=%d replica=%d after %.2f s", self.a.job_id,
                 self.a.attempt, self.a.stage, self.a.replica, time.monotonic() - t0)

    def at_boundary(self, step: int) -> None:
        """Called before starting ``step``: during a fence, report the boundary; stage 0 waits here
        until the switch step is known. Raises FenceReached at the switch step."""
        if not self.fence_pending.is_set():
            return
        self._report("fence", step)
        while self.a.is_first and not self.switch_step:
            self.stop.wait(POLL_S)
            self._report("fence", step)
        if self.switch_step and step > self.switch_step:
            self._wait_past_switch(step)
        if self.switch_step and step == self.switch_step:
            raise FenceReached()

    def _wait_past_switch(self, step: int) -> None:
        """The worker stands at boundary ``step``, past the switch step (coordinator/jobs/churn.py
        says why that should not happen). It cannot stop at the switch step (its weights hold the
        steps after it) and must not run on (each step would be done again by the re-plan): it
        keeps reporting its boundary, which makes the coordinator fall back to its last checkpoint
        (fence ``overrun``), until the coordinator stops this attempt (PeerError, stop set)."""
        log.error("fence: job=%s attempt=%d stage=%d replica=%d stands at step %d, past the switch step %d; "
                  "waiting for the coordinator to re-plan", self.a.job_id, self.a.attempt, self.a.stage,
                  self.a.replica, step, self.switch_step)
        while True:
            self.stop.wait(SWITCH_POLL_S)
            self._report("fence", step)

    def while_waiting(self, step: int) -> None:
        """Called while the worker waits for an input of ``step``: raises FenceReached when
        ``step`` is the switch step (only a stage other than the first can wait there, for the
        first input of the step, which will not come: stage 0 does not start it). The switch
        step arrives with progress replies and assignment polls; a worker waiting during a fence
        whose switch step it does not know yet also asks for it (every ``SWITCH_POLL_S``), or it
        would wait out its peer timeout and blame a stage 0 that stopped at the switch step."""
        # only a stage after the first asks (its report of the step it waits for is its boundary,
        # one the coordinator waits for before it sets the switch step), while a stage 0 asking
        # from inside a step would name a step it is about to finish as its boundary (that step
        # was then done by both attempts). A worker waiting past the switch step says so: the
        # coordinator falls back to its last checkpoint (churn.py, fence "overrun")
        past = bool(self.switch_step) and step > self.switch_step
        if not self.a.is_first and self.fence_pending.is_set() and (past or not self.switch_step) \
                and time.monotonic() - self._last_switch_poll >= SWITCH_POLL_S:
            self._last_switch_poll = time.monotonic()
            try:  # one try: the wait itself must not block on a coordinator outage
                self.on_ack(self.client.report(self._request("fence", step)))
            except SwarmError as exc:
                log.debug("switch step poll failed: %s", exc)
        if self.fence_pending.is_set() and self.switch_step and step == self.switch_step:
            raise FenceReached()

    def fenced(self, step: int) -> None:
        self._report("fenced", step)
