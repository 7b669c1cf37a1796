"""Probation: more checking for the nodes of a chain a spot check retired without a culprit (issue 13).

Protocol (the decision; the coordinator's side is coordinator/inference/checks.py, ``Probations``):

- A stage after the first of a chain is blamed for a wrong step only if every earlier step of the
  session on that chain was checked (verify.py ``ChainResult.fresh``); at ``--verify-prob`` p < 1
  it usually is not, so a faulty later stage only gets its chain retired. :func:`after_check` puts
  every node of a chain that a check retired **without a culprit** (no node of that chain
  quarantined) on probation; a node is put there only by a failed check of a chain it was in.
- While a chain holds a node on probation (:func:`on_probation`) every check window of every
  session it serves is checked (p = 1 for that chain): a session attached to it after that is
  checked from its first step, so every check is fresh and a faulty later stage is blamed and
  quarantined as usual (by verify.py, never by probation: probation only costs checking).
- A node on probation leaves it after it passed :func:`windows_required` checked windows (one
  replay of a window's held steps, all passed) on fresh chains whose caches were not pushed: checks
  in which it could have been blamed. The count starts at PROBATION_WINDOWS and doubles each time
  the node is put on probation again (``strikes``), up to 2**MAX_DOUBLINGS times: a node that
  behaves while watched and alters steps after gets longer probations each time.
- A node quarantined by a check leaves probation (quarantine supersedes it).

Pure: the book is a mapping of node id to a frozen :class:`NodeProbation`; every function returns
a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from swarm.inference.verify import ChainResult, Outcome

# Checked windows to pass to leave a first probation. A node altering a fraction P of its steps is
# caught in a checked window of W >= 32 steps with probability 1 - (1 - P)**W (> 0.99 at P = 0.15),
# so 4 windows leave a faulty node little chance; an honest node costs 4 replays (~2x the
# generated tokens of 4 windows) on another chain.
PROBATION_WINDOWS = 4
MAX_DOUBLINGS = 4  # the 5th probation on asks 64 windows, and so does every later one


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeProbation:
    """One node's probation record: how often it was put on probation (``strikes``), the checked
    windows it passed since the last time, when (clock seconds) and why it was put there."""

    strikes: int
    passed: int = 0
    since_s: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.strikes < 1 or self.passed < 0:
            raise ValueError(f"a probation has at least one strike and no negative passes, got {self.strikes}, "
                             f"{self.passed}")

    @property
    def required(self) -> int:
        """Checked windows to pass to leave this probation."""
        return windows_required(self.strikes)

    @property
    def active(self) -> bool:
        return self.passed < self.required


def windows_required(strikes: int) -> int:
    """Checked windows a node put on probation for the ``strikes``-th time passes to leave it."""
    if strikes < 1:
        raise ValueError(f"strikes counts probations, at least 1, got {strikes}")
    return PROBATION_WINDOWS << min(strikes - 1, MAX_DOUBLINGS)


def active(book: Mapping[str, NodeProbation]) -> set[str]:
    """Node ids on probation now."""
    return {nid for nid, p in book.items() if p.active}


def on_probation(book: Mapping[str, NodeProbation], node_ids: Iterable[str]) -> list[str]:
    """The nodes of ``node_ids`` (a chain's) on probation, in order: the chain's windows are all checked
    while this is not empty."""
    return [nid for nid in node_ids if nid in book and book[nid].active]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbationChange:
    """The book after a check and who ``entered`` / ``left`` probation (for the log)."""

    book: Mapping[str, NodeProbation]
    entered: tuple[str, ...] = ()
    left: tuple[str, ...] = ()


def after_check(book: Mapping[str, NodeProbation], *, serving: ChainResult, checker: ChainResult | None,
                outcome: Outcome, window_done: bool, now_s: float) -> ProbationChange:
    """The book after a check concluded with ``outcome`` (verify.py ``resolve``) of ``serving``'s step
    against ``checker``'s replay (None: void, nothing changes). ``window_done``: the step was the last
    held step of its replayed window (the earlier ones passed, or the chain would have been retired)."""
    new = dict(book)
    entered: list[str] = []
    left: list[str] = []
    if checker is None:
        return ProbationChange(book=new)
    guilty = {nid for nid, _ in outcome.quarantine}
    for nid in guilty:  # quarantined: probation is moot
        if nid in new:
            if new.pop(nid).active:
                left.append(nid)
    for chain in (serving, checker):
        nodes = [st.node_id for st in chain.stages]
        if chain.replica not in outcome.retire or guilty & set(nodes):
            continue  # not retired, or retired with a culprit (the others of the chain are not suspected)
        for nid in dict.fromkeys(nodes):
            old = new.get(nid)
            new[nid] = NodeProbation(strikes=(old.strikes + 1) if old else 1, since_s=now_s,
                                     reason=outcome.reason or f"a spot check retired replica {chain.replica}")
            if old is None or not old.active:
                entered.append(nid)
    passed = outcome.release and serving.replica not in outcome.retire and not guilty
    if passed and window_done and serving.fresh and not serving.cache_pushed:
        for nid in dict.fromkeys(st.node_id for st in serving.stages):
            p = new.get(nid)
            if p is not None and p.active:
                new[nid] = replace(p, passed=p.passed + 1)
                if not new[nid].active:
                    left.append(nid)
    return ProbationChange(book=new, entered=tuple(entered), left=tuple(left))
