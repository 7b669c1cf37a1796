"""Whether a spot check's witness copies bind the node it checked (issue 13; the node's side is
node/training/commitments.py). Pure; coordinator/jobs/spotchecks.py ``Judge`` calls it.

A checker recomputes its target from copies the target's pipeline neighbours (its witnesses)
send it. Before commitments, a witness sending a wrong copy made an honest target look wrong,
and the checker's accusation fell on the target. Now every worker commits, in each step's
report, to digests of what it computed on and sent, micro-batch by micro-batch, and a checker
reports the digests of the copies each check used. A confirmed mismatch is weighed so:

- **bound**: every copy the check used is what the target itself committed to (or the target
  committed nothing for it: a node that does not commit is not protected by commitments). The
  target computed a wrong result from inputs it owns to: the checker's accusation of it stands;
- a copy differs from the target's word, and **from the witness's own commitment** too: the
  witness sent the checker something other than what it reported sending or receiving. The
  checker accuses the witness (a lying checker could say so of anyone: the dispute rules of
  coordinator/jobs/disputes.py weigh checkers' words);
- a copy differs from the target's word, and the **witness's commitment equals the copy** (or the
  witness left that tensor out of its commitments, which an honest one never does): the two ends of the
  boundary disagree about what passed between them, and the coordinator cannot tell which one
  lies. It is the witness's word against the target's: a dispute with the witness as accuser, so
  the rules of disputes.py apply: the job rolls back and re-plans them apart (not pipeline
  neighbours), the target is on probation; a second, different node disputing the target
  convicts it (a node lying about what it received, to void the checks of its own results,
  disagrees with each new neighbour), and a witness disputing two different nodes nobody else
  faults is convicted (a witness framing its neighbours must frame a second one once moved);
- the witness has not reported the step yet: the check waits for it (until the Judge prunes the
  step: a witness that never reports voids the check).

Where the two ends of a boundary run different kernels (a CPU and a GPU node, or two codec
backends), an honest decode may differ in its last bits. Honest results then still pass their
checks (the comparison has a tolerance; only mismatches are weighed here), but a wrong result's
check is contested rather than bound, and the target is convicted through disputes with two
different neighbours instead of through two checkers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A copy (named as the target's side of the tensor) -> (which witness sent it: -1 the previous
# stage, +1 the next, and the witness's own commitment of the same tensor). Every copy has one: a
# copy the witness did not commit to would let a lying checker put words in an honest witness's
# mouth (claim a copy that differs from the target's word, and the witness becomes the accuser).
WITNESS_SIDE: dict[str, tuple[int, str]] = {
    "input": (-1, "output"), "grad_in": (-1, "grad_out"),
    "output": (1, "input"), "output_ref": (1, "input_ref"), "grad_out": (1, "grad_in")}


@dataclass(frozen=True, slots=True)
class Contest:
    """A confirmed mismatch the copies do not pin on the target: ``accuser`` accuses ``accused``."""

    accuser: str
    accused: str
    reason: str


WAIT = "wait"  # a witness's commitments are needed and not reported yet
VOID = "void"  # a copy differs from the target's word and no witness of it is known: no evidence


def contested(copies: dict[str, bytes], micro_batch: int, target: dict[tuple[int, str], bytes] | None) -> list[str]:
    """The copies (by the target's name for them) that differ from the target's own commitment."""
    if not target:
        return []
    return [what for what, d in sorted(copies.items(), key=lambda kv: _order(kv[0]))
            if what in WITNESS_SIDE and target.get((micro_batch, what)) not in (None, d)]


def bound(copies: dict[str, bytes], micro_batch: int, target: dict[tuple[int, str], bytes] | None) -> bool:
    """Whether the check used copies and each is what the target committed to."""
    return bool(copies) and bool(target) and all(target.get((micro_batch, w)) == d for w, d in copies.items())


def weigh(copies: dict[str, bytes], micro_batch: int, *, checker: str, target_id: str,
          target: dict[tuple[int, str], bytes] | None,
          witness: Callable[[int], tuple[str, dict[tuple[int, str], bytes] | None] | None],
          what_checked: str) -> None | Contest | str:
    """A confirmed mismatch found by ``checker``: None when the copies bind the target (the
    accusation of it stands), a :class:`Contest` naming whom to accuse instead, :data:`WAIT` or
    :data:`VOID`.
    ``witness(side)``: (node id, its commitments or None when not reported yet) of the target's
    previous (-1) or next (+1) stage holder of the micro-batch, or None when it has none."""
    for what in contested(copies, micro_batch, target):
        side, theirs = WITNESS_SIDE[what]
        w = witness(side)
        if w is None:
            return VOID  # no such neighbour in the plan: nobody to weigh the copy against
        node, commits = w
        about = f"the {what} of micro-batch {micro_batch} (a {what_checked} check)"
        if commits is None:
            return WAIT
        said = commits.get((micro_batch, theirs))
        if said is not None and said != copies[what]:
            return Contest(checker, node, (
                f"its witness copy of {about} of node {target_id[:12]} is not what it reported itself sending "
                f"or receiving: it sent the checker a false copy"))
        return Contest(node, target_id, (
            f"node {node[:12]} and node {target_id[:12]} disagree on {about}: the copy node {node[:12]} witnessed "
            f"differs from what node {target_id[:12]} reported computing on or sending; one of them misreports it"))
    return None


def _order(what: str) -> int:
    return tuple(WITNESS_SIDE).index(what) if what in WITNESS_SIDE else len(WITNESS_SIDE)
