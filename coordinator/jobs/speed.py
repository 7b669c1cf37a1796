"""What each training node was seen to do, by its neighbours (issue 13 item 1, second half).

Protocol: every stage worker reports, per step, how long it was blocked waiting for its
neighbours' tensors: ``wait_activation_s`` (for the previous stage's activations) and
``wait_gradient_s`` (for the next stage's gradients), with its ``step_s``. A node's pace is
therefore reported by the nodes around it, never by itself. In a pipeline every stage runs at
the pace of the slowest; the slowest never waits for its neighbours, and they wait for it: a
stage planned to take as long as its neighbours that really takes 1/r times as long keeps them
waiting about (1 - r) of their step. All decisions here are pure functions of these figures and
the plan:

- :func:`neighbour_views`: a report -> (node seen, direction, wait fraction) for the reporter's
  neighbours of the same replica: the share of the reporter's step it spent waiting for that
  neighbour (clamped to [0, MAX_WAIT_FRACTION]).
- :class:`SpeedBook` keeps a running estimate (EMA) per node and direction, and per node the
  LOWER of its directions: a node downstream of a slow one keeps its next stage waiting (its
  activations come late) but not its previous stage (its gradients come at its own pace), so it
  is not blamed for the slow one.
- :func:`relative_speeds`: a node's pace relative to plan, ``(1 - wait fraction)`` over the
  median of the same among the job's other nodes (the pipeline's fill and drain make every
  neighbour wait a little; that cancels). 1.0 = as planned relative to the rest; a node doing
  half the work per second its plan gave it is near 0.5. The plan's layer split (layers per
  node by planned TFLOPS) is the normalisation: the waits compare real time against the plan's
  balance. The node's speed as seen is ``planned TFLOPS x relative speed`` (at most its plan).
- :func:`assess`: a node below ``SLOW_RATIO`` (0.5) for ``MIN_SAMPLES`` consecutive
  observations spanning ``SLOW_WINDOW_S`` is slow: the job records a ``slow_node`` event with
  the figures, once per attempt (coordinator/jobs/speedwatch.py), and the node's running
  estimate in the trust store (``observed_tflops``) is its speed as seen, which the next plan
  and the plan preview use: a claim more than 2x above it is replaced
  (swarm.membership.effective_tflops). The job loop may then re-balance the job's layers
  around it at a fence, without rollback (coordinator/jobs/rebalance.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SLOW_RATIO = 0.5  # seen / planned speed (relative to the job's other nodes) below which a node is slow
SLOW_WINDOW_S = 5.0  # ... sustained this long
MIN_SAMPLES = 8  # ... over at least this many consecutive neighbour observations (steps)
EMA = 0.3  # weight of a new observation in a node's running estimate per direction
MAX_WAIT_FRACTION = 0.99


def neighbour_views(report: dict[str, Any], reporter: dict[str, Any], assignments: list[dict[str, Any]]
                    ) -> list[tuple[str, str, float]]:
    """(node id, direction, fraction of the reporter's step spent waiting for it) for the
    reporter's neighbours of its replica. Ignores figures that are missing, not finite or
    negative, and a step of no length."""
    step_s = report.get("step_s") or 0.0
    if not (math.isfinite(step_s) and step_s > 0):
        return []
    by_key = {(a["stage"], a["replica"]): a for a in assignments}
    out = []
    for field_name, stage, direction in (("wait_activation_s", reporter["stage"] - 1, "forward"),
                                         ("wait_gradient_s", reporter["stage"] + 1, "backward")):
        wait = report.get(field_name)
        seen = by_key.get((stage, reporter["replica"]))
        if seen is None or seen["node_id"] == reporter["node_id"] or wait is None or not (math.isfinite(wait)
                                                                                         and wait >= 0):
            continue
        out.append((seen["node_id"], direction, min(MAX_WAIT_FRACTION, wait / step_s)))
    return out


def relative_speeds(wait_fractions: dict[str, float]) -> dict[str, float]:
    """Per node: (1 - the wait it imposes) over the median of that among the job's other nodes
    (in a 2-node job the slow node does not pull its own reference down)."""
    pace = {n: 1.0 - min(MAX_WAIT_FRACTION, max(0.0, q)) for n, q in wait_fractions.items()}
    if len(pace) < 2:
        return {}  # one node has nothing to be compared with
    out = {}
    for n, p in pace.items():
        mid = statistics.median(v for m, v in pace.items() if m != n)
        if mid > 0:
            out[n] = p / mid
    return out


@dataclass(frozen=True, slots=True)
class SlowState:
    since_s: float | None = None  # first observation of the current run below SLOW_RATIO
    samples: int = 0  # observations in that run
    reported: bool = False


def assess(state: SlowState, relative: float, now_s: float) -> tuple[SlowState, bool]:
    """Fold one observation of a node's relative speed; returns (new state, report it now)."""
    if relative >= SLOW_RATIO:
        return SlowState(reported=state.reported), False
    since = state.since_s if state.since_s is not None else now_s
    samples = state.samples + 1
    due = not state.reported and samples >= MIN_SAMPLES and now_s - since >= SLOW_WINDOW_S
    return SlowState(since_s=since, samples=samples, reported=state.reported or due), due


@dataclass(slots=True)
class SpeedBook:
    """Running estimates of one job attempt: per node and direction, an EMA of the wait fraction
    it imposes; and per node the :class:`SlowState`. Not thread-safe (the caller locks)."""

    estimates: dict[tuple[str, str], float] = field(default_factory=dict)
    slow: dict[str, SlowState] = field(default_factory=dict)

    def add(self, node_id: str, direction: str, wait_fraction: float) -> None:
        prev = self.estimates.get((node_id, direction))
        self.estimates[(node_id, direction)] = wait_fraction if prev is None else (1 - EMA) * prev + EMA * wait_fraction

    def imposed(self) -> dict[str, float]:
        """Per node, the lower of its directions' wait fractions."""
        out: dict[str, float] = {}
        for (node, _), v in self.estimates.items():
            out[node] = min(out.get(node, 1.0), v)
        return out

    def observe(self, node_id: str, now_s: float) -> tuple[float | None, bool]:
        """After a new observation of ``node_id``: its relative speed (None while nothing to
        compare with) and whether it is now to be reported slow."""
        rel = relative_speeds(self.imposed()).get(node_id)
        if rel is None:
            return None, False
        state, due = assess(self.slow.get(node_id, SlowState()), rel, now_s)
        self.slow[node_id] = state
        return rel, due
