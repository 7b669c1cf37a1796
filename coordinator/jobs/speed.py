"""What each training node was seen to do, by its neighbours (issue 13 item 1, second half).

Protocol: every stage worker times, per step, the gaps between consecutive arrivals of the
tensors its neighbours send it (node/training/exchange.py ``Endpoint.arrival_interval``) and
reports their median in its progress: ``activation_interval_s`` (from the previous stage:
one micro-batch's forward of that stage's layers) and ``gradient_interval_s`` (from the next
stage: one micro-batch's backward). A node's pace is therefore reported by the nodes around it,
never by itself. All decisions here are pure functions of those figures and the plan:

- :func:`neighbour_views`: a report -> (node seen, seen TFLOPS) for the reporter's neighbours of
  the same replica: the seen stage's FLOPs per micro-batch in that direction (its layers; the
  backward is 2x the forward) over the interval. A lower bound of the node's speed (a node
  starved by its own upstream is seen at its upstream's pace); :class:`SpeedBook` keeps, per
  node, the lowest-bias view: the FASTER of its two neighbours' running estimates, so a node
  downstream of a slow one is not blamed for it (its previous stage sees its backward at its own
  pace).
- :func:`relative_speeds`: each node's seen TFLOPS over the TFLOPS the planner gave it, divided
  by the job's median of the same: 1.0 = as fast as planned relative to the rest. Overheads
  common to all (Python, transport, bubbles) cancel.
- :func:`assess`: a node below ``SLOW_RATIO`` (0.5) of plan for ``SLOW_WINDOW_S`` on at least
  ``MIN_SAMPLES`` observations is slow: the job records a ``slow_node`` event with the figures,
  once per attempt (coordinator/jobs/service.py), and the node's running estimate (TrustStore,
  ``observed_tflops``) becomes ``planned TFLOPS x relative speed``, so the next plan (and the
  plan preview) uses what it was seen to do; a claim more than 2x above it is replaced
  (swarm.membership.effective_tflops).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SLOW_RATIO = 0.5  # seen / planned speed (relative to the job) below which a node is slow
SLOW_WINDOW_S = 20.0  # ... sustained this long
MIN_SAMPLES = 5  # ... over at least this many neighbour observations
EMA = 0.3  # weight of a new observation in a node's running estimate per direction


def stage_flops_per_micro_batch(*, num_layers: int, flops_per_token_per_layer: float, tokens: int,
                                direction: str) -> float:
    """FLOPs of one micro-batch through ``num_layers`` layers: the forward is a third of the
    training FLOPs (6 x params = 2 forward + 4 backward), the backward two thirds."""
    share = 1.0 / 3.0 if direction == "forward" else 2.0 / 3.0
    return num_layers * flops_per_token_per_layer * tokens * share


def neighbour_views(report: dict[str, Any], reporter: dict[str, Any], assignments: list[dict[str, Any]], *,
                    flops_per_token_per_layer: float, tokens_per_micro_batch: int) -> list[tuple[str, str, float]]:
    """(node id, direction, seen TFLOPS) for the neighbours the report's intervals time. Ignores
    figures that are missing, not finite or not positive."""
    by_key = {(a["stage"], a["replica"]): a for a in assignments}
    out = []
    for field_name, stage, direction in (("activation_interval_s", reporter["stage"] - 1, "forward"),
                                         ("gradient_interval_s", reporter["stage"] + 1, "backward")):
        gap = report.get(field_name) or 0.0
        seen = by_key.get((stage, reporter["replica"]))
        if seen is None or seen["node_id"] == reporter["node_id"] or not (math.isfinite(gap) and gap > 0):
            continue
        flops = stage_flops_per_micro_batch(num_layers=seen["last_layer_excl"] - seen["first_layer"],
                                            flops_per_token_per_layer=flops_per_token_per_layer,
                                            tokens=tokens_per_micro_batch, direction=direction)
        out.append((seen["node_id"], direction, flops / gap / 1e12))
    return out


def relative_speeds(seen_tflops: dict[str, float], planned_tflops: dict[str, float]) -> dict[str, float]:
    """Per node: (seen / planned) / the median of that ratio over the job's nodes with both."""
    eff = {n: s / planned_tflops[n] for n, s in seen_tflops.items() if planned_tflops.get(n, 0) > 0 and s > 0}
    if len(eff) < 2:
        return {}  # one node has nothing to be compared with
    mid = statistics.median(eff.values())
    return {n: e / mid for n, e in eff.items()} if mid > 0 else {}


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
    """Running estimates of one job attempt: per node and direction, an EMA of the seen TFLOPS;
    and per node the :class:`SlowState`. Not thread-safe (the job service holds its lock)."""

    estimates: dict[tuple[str, str], float] = field(default_factory=dict)
    slow: dict[str, SlowState] = field(default_factory=dict)

    def add(self, node_id: str, direction: str, tflops: float) -> None:
        prev = self.estimates.get((node_id, direction))
        self.estimates[(node_id, direction)] = tflops if prev is None else (1 - EMA) * prev + EMA * tflops

    def seen(self) -> dict[str, float]:
        """Per node, the faster of its directions' estimates (the less biased lower bound)."""
        out: dict[str, float] = {}
        for (node, _), v in self.estimates.items():
            out[node] = max(out.get(node, 0.0), v)
        return out

    def observe(self, node_id: str, planned: dict[str, float], now_s: float) -> tuple[float | None, bool]:
        """After a new observation of ``node_id``: its relative speed (None while nothing to
        compare with) and whether it is now to be reported slow."""
        rel = relative_speeds(self.seen(), planned).get(node_id)
        if rel is None:
            return None, False
        state, due = assess(self.slow.get(node_id, SlowState()), rel, now_s)
        self.slow[node_id] = state
        return rel, due
