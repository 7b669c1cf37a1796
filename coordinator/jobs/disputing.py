"""The dispute side of the job loop (:class:`Disputing`, a part of
:class:`coordinator.jobs.service.JobService`): what the service does with a disputed spot check
(the rules are coordinator/jobs/disputes.py):

- :meth:`Disputing._disputed`: a node's first accusation: the pair is kept apart and the accused
  put on probation in every later plan of the job, the job rolls back to before the step and
  re-plans with the two on different stages (event ``disputed``); when no plan can part them (a
  one-stage job), without the accuser if another node can then check the accused; with no such
  node either, the accused is quarantined on the one checker's word;
- :meth:`Disputing._restore_disputes`: a restarted coordinator rebuilds the accusations, the
  pairs and the probations from the jobs' ``disputed`` events.

The host class provides ``store``, ``registry``, ``judge``, ``_apart``, ``_probation``,
``_first_bad``, ``_plan``, ``_node_state``, ``_quarantine`` and ``_recover``.
"""

from __future__ import annotations

import logging

from swarm.errors import SwarmError

from coordinator.jobs.disputes import PROBATION_STEPS, Accusation, Verdict
from coordinator.jobs.planning import conflicts
from coordinator.jobs.store import Job

log = logging.getLogger(__name__)


class Disputing:
    """Disputed spot checks of running jobs (see the module docstring)."""

    def _restore_disputes(self, job: Job) -> None:
        """The job's disputed spot checks, from its ``disputed`` events (a previous coordinator
        process's): the judge's accusations, the pairs kept apart and the probations. An
        accusation by a node quarantined since (a liar) or of one (convicted) is over."""
        out = []
        for e in self.store.events(job.id, limit=100_000):
            f = e["fields"]
            if e["kind"] != "disputed" or not isinstance(f.get("accuser"), str) or not isinstance(f.get("node"), str):
                continue
            if any(self._node_state(n) == "quarantined" for n in (f["accuser"], f["node"])):
                continue
            out.append(Accusation(accuser=f["accuser"], target=f["node"], attempt=int(f.get("attempt", 0)),
                                  step=int(f.get("step", 0)), reason=str(f.get("reason", ""))))
        if not out:
            return
        self.judge.restore(job.id, out)
        self._keep_apart(job.id, out)
        log.info("restored %d disputed spot check(s) job=%s", len(out), job.id)

    def _disputed(self, job: Job, disputes: list[Accusation]) -> bool:
        """A checker found a node's result wrong, and nobody else has yet: roll back to before the
        step and re-plan with the two on different stages (coordinator/jobs/planning.py
        ``separate``), so a second checker decides. When no plan can part them (a one-stage job),
        the accuser is left out of the job if another node can then check the accused; failing
        that too, the accused is quarantined on the one checker's word (as before disputes). When
        no plan is possible at all right now (nodes briefly away), the job rolls back all the same
        and waits for nodes (``_recover``), with the pair kept apart once it re-plans. True when
        the job was re-planned or set waiting."""
        self._keep_apart(job.id, disputes)
        jp, lone = self._part(job, disputes, self._plan_or_none(job))
        if lone:  # a plan, but none that parts them, and no spare node either
            self._trust_one_checker(job, lone)
            return False  # the quarantine re-plans the job (from before the step) on the next tick
        first = min(d.step for d in disputes)
        self._first_bad[job.id] = min(self._first_bad.get(job.id, first), first)
        used = {a["node_id"] for a in jp.assignments} if jp is not None else set()
        for d in disputes:
            if jp is None:  # no plan at all right now (nodes away): roll back and wait, as for a lost stage
                how = "the two apart once enough nodes are online (none can be planned now)"
            elif d.accuser in used:
                how = "the two apart (on different stages, not pipeline neighbours where the nodes allow it)"
            else:
                how = f"node {d.accuser[:12]} left out of the job"
            self.store.add_event(job.id, "disputed", (
                f"node {d.accuser[:12]} disputes node {d.target[:12]}'s result ({d.reason}); one node's word is "
                f"not enough: resuming from before step {d.step} with {how}, so other nodes check and witness "
                f"{d.target[:12]}"), accuser=d.accuser, node=d.target, step=d.step, reason=d.reason,
                attempt=d.attempt, accuser_left_out=jp is not None and d.accuser not in used)
        self._recover(job, f"a spot check of node {disputes[0].target[:12]} was disputed", cause="disputed_check",
                      plan=jp)
        return True

    def _part(self, job: Job, disputes: list[Accusation], jp) -> tuple[object, list[Accusation]]:
        """(``jp`` or a plan that parts more pairs, the disputes no plan can part). When ``jp``
        (None: no plan possible now) keeps a disputed pair on one stage (a one-stage job), the
        plan without the accusers if it still checks each accused node."""
        pairs = self._apart.get(job.id, set())
        if jp is None:
            return None, []
        stuck = {frozenset(c) for c in conflicts(jp.plan, pairs)}
        lone = [d for d in disputes if frozenset((d.accuser, d.target)) in stuck]
        if lone:
            without = self._plan_or_none(job, leave_out=frozenset(d.accuser for d in lone))
            if without is not None and not conflicts(without.plan, pairs) and all(
                    _checked(without, d.target) for d in lone):
                return without, []
        return jp, lone

    def _trust_one_checker(self, job: Job, lone: list[Accusation]) -> None:
        """No plan can give these accused nodes another checker: each is quarantined on its one
        checker's word (as before disputes)."""
        for d in lone:
            self._quarantine(job, Verdict(d.target, f"{d.reason} (no other node could check it: one checker's word)",
                                          d.step))

    def _parted_after_wait(self, job: Job, jp):
        """The plan a job that waited for nodes resumes with, given its open disputes (one
        accuser each, made while it could not be planned): ``jp`` or one without an accuser
        (:meth:`_part`); None after quarantining accused nodes no plan can give another checker
        (the next tick plans without them)."""
        disputes = self.judge.open_disputes(job.id)
        if not disputes:
            return jp
        jp, lone = self._part(job, disputes, jp)
        if lone:
            self._trust_one_checker(job, lone)
            return None
        return jp

    def _keep_apart(self, job_id: str, accusations: list[Accusation]) -> set[frozenset[str]]:
        """Every later plan of the job keeps each accuser apart from the node it accused, which is
        on probation for PROBATION_STEPS steps after the accused step; returns the job's pairs."""
        pairs = self._apart.setdefault(job_id, set())
        pairs.update(frozenset((a.accuser, a.target)) for a in accusations)
        probation = self._probation.setdefault(job_id, {})
        for a in accusations:
            probation[a.target] = max(probation.get(a.target, 0), a.step + PROBATION_STEPS)
        return pairs

    def _plan_or_none(self, job: Job, **kw):
        try:
            return self._plan(job, degrade=True, **kw)
        except SwarmError as exc:  # InfeasiblePlanError included
            log.info("cannot plan around a disputed check job=%s (%s)", job.id, exc)
            return None


def _checked(jp, node_id: str) -> bool:
    """Whether a worker of ``jp`` checks ``node_id`` (its assignments' spot-check plans)."""
    return any((a.get("verify") or {}).get("check", {}).get("node_id") == node_id for a in jp.assignments)
