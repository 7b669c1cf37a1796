"""Whether a running job re-balances its layers around a node seen slow (issue 13 item 1): pure.

Protocol. coordinator/jobs/speed.py finds a node whose neighbours see it below ``SLOW_RATIO`` of
its planned speed (job event ``slow_node``). The job loop (coordinator/jobs/fencing.py
``_maybe_rebalance``) then asks the planner for the plan it would make with the speeds as SEEN
(each node of the job at planned TFLOPS x its relative speed, at most its plan) and scores the
current plan and that one under the same seen speeds (swarm.scheduling ``evaluate_plan``,
objective ``predicted_iteration``: compute with the 1F1B bubble plus communication). It hands
the figures to :func:`decide`; on a yes it opens a re-balance fence (coordinator/jobs/churn.py):
every worker stops at a switch step ``S`` with a full checkpoint, and the job is re-planned from
``S`` with the seen speeds and the new layer split (job event ``rebalance``). No step is lost
or done twice: steps < S ran under the old split, steps >= S run under the new one, whose
workers load their (new) layer ranges from the checkpoint at ``S`` (the coordinator's copy, or
peer to peer where a node keeps the same layers).

Rules of :func:`decide`, in order (each "no" says why):

- the predicted step time must drop by at least ``MIN_GAIN`` (20 %): a re-plan stops every
  worker, checkpoints and reloads, which a small gain does not pay back;
- at least ``MIN_STEPS_LEFT`` steps left (like a growth fence: a job about to end finishes as is);
- the attempt has run at least ``SETTLE_S`` (its speeds are its own, not the previous plan's);
- hysteresis: at most one re-balance per job per ``COOLDOWN_S`` (from the last one's event), and
  never a second for the same node unless it got slower still: seen below ``SLOWER_STILL`` x
  the speed it was seen at when the job last re-balanced for it. A node re-balanced for runs
  slow relative to its (new, smaller) share only if it slowed down again, so a job never flaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

MIN_GAIN = 0.2  # predicted step time must drop by at least this fraction
COOLDOWN_S = 300.0  # at most one re-balance per job per 5 minutes
SLOWER_STILL = 0.75  # a node re-balanced for before: only again once seen below 0.75x its speed then
MIN_STEPS_LEFT = 10  # a job this close to its end finishes with the split it has
SETTLE_S = 5.0  # the attempt ran this long (speed.py's SLOW_WINDOW_S: a slow_node needs as much)
RETRY_S = 30.0  # the loop weighs a still-slow node again after this long (the planner runs each time)


@dataclass(frozen=True, slots=True, kw_only=True)
class Past:
    """A re-balance the job already did (from its ``rebalance`` event)."""

    node_id: str
    at_s: float
    seen_tflops: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A node seen slow and what re-planning around it would predict."""

    node_id: str
    seen_ratio: float  # seen / planned speed, relative to the job's other nodes
    seen_tflops: float
    current_step_s: float  # the current plan's predicted step time under the seen speeds
    new_step_s: float  # the re-plan's, same speeds
    steps_left: int
    attempt_age_s: float  # since the attempt's workers started
    now_s: float

    def __post_init__(self) -> None:
        for name in ("seen_ratio", "seen_tflops", "current_step_s", "new_step_s", "attempt_age_s", "now_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.current_step_s <= 0:
            raise ValueError("current_step_s must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    go: bool
    gain: float  # predicted fraction of the step time saved (may be negative)
    why: str


def predicted_gain(current_step_s: float, new_step_s: float) -> float:
    return 1.0 - new_step_s / current_step_s


def calibrated(*, measured_step_s: float | None, current: tuple[float, float],
               new: tuple[float, float]) -> tuple[float, float]:
    """(current, new) predicted step seconds from the scheduler's (compute, communication) of each
    plan under the seen speeds, with compute scaled so the current plan predicts the step time
    the workers measured. The scheduler prices compute from peak TFLOPS x a fixed efficiency;
    real stages also spend framework time per layer, which the waits that measured the speeds
    include, so on small models its compute is far below what the workers see and communication
    would look dominant. The scale is the same for both plans (only the split differs). Without a
    measurement, or one the model's communication alone exceeds, unscaled."""
    (cc, cm), (nc, nm) = current, new
    k = 1.0
    if measured_step_s is not None and math.isfinite(measured_step_s) and cc > 0 and measured_step_s > cc + cm:
        k = (measured_step_s - cm) / cc
    return cc * k + cm, nc * k + nm


def decide(c: Candidate, past: Iterable[Past]) -> Decision:
    """Re-balance around ``c.node_id`` now? ``past``: the job's earlier re-balances."""
    gain = predicted_gain(c.current_step_s, c.new_step_s)
    past = list(past)
    if gain < MIN_GAIN:
        return Decision(go=False, gain=gain, why=f"predicted gain {gain:.0%} is below {MIN_GAIN:.0%}")
    if c.steps_left < MIN_STEPS_LEFT:
        return Decision(go=False, gain=gain, why=f"only {c.steps_left} step(s) left")
    if c.attempt_age_s < SETTLE_S:
        return Decision(go=False, gain=gain, why=f"the attempt ran only {c.attempt_age_s:.1f} s")
    if past:
        last = max(p.at_s for p in past)
        if c.now_s - last < COOLDOWN_S:
            return Decision(go=False, gain=gain, why=f"the job re-balanced {c.now_s - last:.0f} s ago "
                                                     f"(at most once per {COOLDOWN_S:.0f} s)")
    mine = [p for p in past if p.node_id == c.node_id]
    if mine:
        then = max(mine, key=lambda p: p.at_s).seen_tflops
        if not c.seen_tflops < SLOWER_STILL * then:
            return Decision(go=False, gain=gain, why=f"already re-balanced for this node at {then:.4g} TFLOPS seen; "
                                                     f"now {c.seen_tflops:.4g} (not below {SLOWER_STILL:g}x that)")
    return Decision(go=True, gain=gain, why=f"predicted step time {c.current_step_s:.4g} s -> {c.new_step_s:.4g} s "
                                            f"({gain:.0%} faster)")


def history(events: Iterable[dict[str, Any]]) -> list[Past]:
    """The job's earlier re-balances from its events (store rows: ``at``, ``kind``, ``fields``)."""
    out = []
    for e in events:
        f = e.get("fields") or {}
        if e.get("kind") == "rebalance" and isinstance(f.get("node"), str):
            try:
                out.append(Past(node_id=f["node"], at_s=float(e["at"]), seen_tflops=float(f["seen_tflops"])))
            except (KeyError, TypeError, ValueError):
                continue
    return out


def layers_of(assignments: list[dict[str, Any]], node_id: str) -> int:
    """How many layers ``node_id`` holds in ``assignments`` (0 when it holds none)."""
    return sum(a["last_layer_excl"] - a["first_layer"] for a in assignments if a["node_id"] == node_id)
