"""Disputed spot checks (issue 13): the rules that turn checkers' reports of wrong results into
verdicts, pure and in memory (:class:`Accusations`, one per job, kept by
coordinator/jobs/spotchecks.py ``Judge``).

A checker may lie: one checker's word would let any replica get the honest node it checks
quarantined. So a confirmed mismatch is an *accusation*:

1. the first accusation of a node opens a **dispute** (:meth:`Accusations.take_disputes`): the
   job service rolls the job back to the last checkpoint at or before the step (the accused may
   be wrong, and averaging spread its effect) and re-plans it with accuser and accused on
   different stages and not pipeline neighbours where the nodes allow it
   (coordinator/jobs/planning.py ``separate``), so another node checks the accused and the
   accuser checks another node; the accused is on **probation**: its micro-batches of the
   :data:`PROBATION_STEPS` steps after the accused step are checked with probability at least
   :data:`PROBATION_PROB` (told to its witnesses and checker, never to itself:
   spotchecks.verify_plans);
2. a second, different checker accusing the same node convicts it (a :class:`Verdict` whose
   first bad step is the first accusation's: the accused worked on since the rollback it
   caused);
3. a checker that has accused two different nodes, neither confirmed by another checker, is
   convicted instead ("misreports its checks", no bad step: nothing it computed was found
   wrong); a convicted node's accusations, of either kind, are void and later ones ignored (a
   corrupting node that accused its own checker back gets nobody convicted that way);
4. the same accuser again adds nothing.

The accuser of a contested check (coordinator/jobs/binding.py) may be a *witness*: the node
whose copy disagrees with what the checked node committed to. A witness framing its neighbours
so accuses each of them, and rule 3 convicts it at the second; a node lying about what it
received, to void the checks of its own wrong results, is disputed by each new neighbour, and
rule 2 convicts it at the second.

Two colluding checkers can still convict an honest node (docs/security.md, Known gaps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A node accused once is on probation (spotchecks.verify_plans): its micro-batches are checked with at
# least this probability for PROBATION_STEPS steps after the step it was accused of, so a second
# checker decides the dispute in a few steps instead of ~1 / (prob x corruption rate) micro-batches
# (measured before probation: accused at step 16, convicted at step 66 at the default 0.05, which
# let the corrupting node spoil 50 more steps). Checking half of a node's micro-batches costs its
# checker about half a step of recomputation, and its witnesses raw copies of half its tensors.
PROBATION_PROB = 0.5
PROBATION_STEPS = 20


@dataclass(frozen=True, slots=True)
class Verdict:
    node_id: str
    reason: str
    first_bad_step: int | None  # None: no result was wrong (stalling, lying about others' results)


@dataclass(frozen=True, slots=True)
class Accusation:
    """A checker (``accuser``) found ``target``'s result of ``step`` wrong (``reason``)."""

    accuser: str
    target: str
    attempt: int
    step: int
    reason: str


@dataclass(slots=True)
class Accusations:
    """One job's accusations (module doc). Not thread-safe: the Judge holds its lock around it."""

    by_target: dict[str, dict[str, Accusation]] = field(default_factory=dict)  # target -> accuser -> first one
    disputes: list[Accusation] = field(default_factory=list)  # first accusations of a node, not yet taken
    convicted: set[str] = field(default_factory=set)  # nodes found guilty: their accusations are void

    def accuse(self, job_id: str, accuser: str, target: str, attempt: int, step: int, reason: str) -> list[Verdict]:
        """Weigh one accusation: a verdict once a second checker confirms it or once the accuser
        has accused two nodes nobody confirmed; else the first accusation of ``target`` opens a
        dispute."""
        if accuser in self.convicted:
            return []  # found guilty (of misreporting its checks, say, in the report it still sends)
        by = self.by_target.setdefault(target, {})
        if accuser in by:
            return []  # the same checker again: nothing new (its dispute is under way)
        by[accuser] = acc = Accusation(accuser=accuser, target=target, attempt=attempt, step=step, reason=reason)
        if len(by) >= 2:
            others = sorted(n[:12] for n in by if n != accuser)
            log.warning("spot check confirmed by a second checker job=%s target=%s accusers=%s", job_id, target[:12],
                        sorted(n[:12] for n in by))
            first = min(a.step for a in by.values())
            self._void(target)  # a node found computing wrong results is no witness against others
            return [Verdict(target, f"{reason}; also found wrong by node(s) {', '.join(others)} checking it earlier",
                            first)]
        alone = sorted(t for t, b in self.by_target.items() if accuser in b and len(b) == 1)
        if len(alone) >= 2:
            self._void(accuser)  # its word is void: its targets start over
            log.warning("a checker accused nodes no other checker confirmed job=%s accuser=%s targets=%s", job_id,
                        accuser[:12], [t[:12] for t in alone])
            return [Verdict(accuser, (
                f"its spot checks or witness copies found wrong results of {len(alone)} different nodes "
                f"({', '.join(t[:12] for t in alone)}) that no other node confirmed: it misreports its checks or "
                f"what it witnessed"), None)]
        log.warning("spot check disputed job=%s accuser=%s target=%s step=%d", job_id, accuser[:12], target[:12], step)
        self.disputes.append(acc)
        return []

    def _void(self, node: str) -> None:
        """``node`` is convicted: every accusation it made is dropped, and later ones ignored."""
        self.convicted.add(node)
        for by in self.by_target.values():
            by.pop(node, None)
        self.disputes = [d for d in self.disputes if d.accuser != node]

    def restore(self, accusations: list[Accusation]) -> None:
        """Accusations a previous coordinator process weighed (its ``disputed`` job events), so a
        restart forgets neither an accused node's first accusation nor a liar's; no dispute is
        opened for them again (their rollbacks happened)."""
        for a in accusations:
            self.by_target.setdefault(a.target, {}).setdefault(a.accuser, a)

    def open_disputes(self) -> list[Accusation]:
        """Accusations of a node by one checker alone (undecided), oldest first."""
        return sorted((next(iter(by.values())) for by in self.by_target.values() if len(by) == 1),
                      key=lambda a: (a.step, a.target))

    def take_disputes(self) -> list[Accusation]:
        """First accusations of a node not taken yet, each returned once."""
        out, self.disputes = self.disputes, []
        return out
