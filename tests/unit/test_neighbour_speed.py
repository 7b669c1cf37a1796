"""Neighbour-seen speeds and slow nodes (coordinator/jobs/speed.py): pure, fake clock, seeded."""

from __future__ import annotations

import random

import pytest

from coordinator.jobs.speed import (MIN_SAMPLES, SLOW_WINDOW_S, SlowState, SpeedBook, assess, neighbour_views,
                                    relative_speeds, stage_flops_per_micro_batch)

pytestmark = pytest.mark.timeout(30)

PER_LAYER, TOKENS = 1e6, 100


def assignments(num_stages=2, num_replicas=1, layers=(2, 2)):
    out, first = [], 0
    bounds = []
    for n in layers:
        bounds.append((first, first + n))
        first += n
    for s in range(num_stages):
        for r in range(num_replicas):
            out.append({"node_id": f"n{s}{r}", "stage": s, "replica": r,
                        "first_layer": bounds[s][0], "last_layer_excl": bounds[s][1]})
    return out


def test_the_next_stage_times_the_forward_and_the_previous_the_backward():
    a = assignments(3, 1, (1, 2, 3))
    views = neighbour_views({"activation_interval_s": 0.01, "gradient_interval_s": 0.02}, a[1], a,
                            flops_per_token_per_layer=PER_LAYER, tokens_per_micro_batch=TOKENS)
    fwd = stage_flops_per_micro_batch(num_layers=1, flops_per_token_per_layer=PER_LAYER, tokens=TOKENS,
                                      direction="forward")
    bwd = stage_flops_per_micro_batch(num_layers=3, flops_per_token_per_layer=PER_LAYER, tokens=TOKENS,
                                      direction="backward")
    assert views == [("n00", "forward", pytest.approx(fwd / 0.01 / 1e12)),
                     ("n20", "backward", pytest.approx(bwd / 0.02 / 1e12))]


def test_a_node_is_never_timed_by_itself_nor_by_bad_figures():
    a = assignments(2, 1)
    for r in ({"activation_interval_s": 0.0}, {"gradient_interval_s": float("nan")}, {"gradient_interval_s": -1.0}):
        assert neighbour_views(r, a[1], a, flops_per_token_per_layer=PER_LAYER, tokens_per_micro_batch=TOKENS) == []
    # the first stage has no previous stage: its activation figure names nobody
    assert neighbour_views({"activation_interval_s": 0.1}, a[0], a, flops_per_token_per_layer=PER_LAYER,
                           tokens_per_micro_batch=TOKENS) == []


def test_relative_speed_cancels_common_overheads():
    # every node runs at 10% of its planned TFLOPS (Python, transport): all are "as planned"
    rel = relative_speeds({"a": 1.0, "b": 2.0, "c": 0.5}, {"a": 10.0, "b": 20.0, "c": 5.0})
    assert rel == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    rel = relative_speeds({"a": 1.0, "b": 2.0, "c": 0.1}, {"a": 10.0, "b": 20.0, "c": 5.0})
    assert rel["c"] == pytest.approx(0.2)
    assert relative_speeds({"a": 1.0}, {"a": 1.0}) == {}


def test_slow_only_when_sustained_and_reported_once():
    s, now = SlowState(), 1000.0
    fired = []
    for k in range(40):
        s, due = assess(s, 0.3, now + k)
        fired.append(due)
    assert fired.count(True) == 1
    first = fired.index(True)
    assert first >= MIN_SAMPLES - 1 and first >= SLOW_WINDOW_S
    # a recovery in between restarts the window
    s, now = SlowState(), 0.0
    for k in range(30):
        s, due = assess(s, 0.3 if k % 10 else 0.9, float(k))
        assert not due


def test_a_slowed_node_is_found_and_its_downstream_neighbour_is_not_blamed():
    """Seeded simulation: 3 stages x 2 replicas, equal plan; n10 (stage 1, replica 0) runs at a
    quarter of its speed. Its neighbours see it slow in both directions; n20 (downstream of it)
    receives activations at n10's pace, but n10 sees n20's gradients at n20's own pace."""
    rng = random.Random(3)
    a = assignments(3, 2, (2, 2, 2))
    planned = {x["node_id"]: 10.0 for x in a}
    base = {"forward": 0.01, "backward": 0.02}  # seconds per micro-batch of an honest stage
    slow_factor = {"n10": 4.0}
    book, reported = SpeedBook(), []
    by = {(x["stage"], x["replica"]): x for x in a}
    for step in range(60):
        now = 100.0 + step
        for x in a:
            s, r = x["stage"], x["replica"]
            report = {}
            if s > 0:  # the previous stage's forward pace, or its own upstream's if slower
                pace = max(slow_factor.get(by[(k, r)]["node_id"], 1.0) for k in range(s))
                report["activation_interval_s"] = base["forward"] * pace * rng.uniform(0.9, 1.1)
            if s < 2:  # the next stage's backward pace
                nxt = by[(s + 1, r)]["node_id"]
                report["gradient_interval_s"] = base["backward"] * slow_factor.get(nxt, 1.0) * rng.uniform(0.9, 1.1)
            for node_id, direction, tf in neighbour_views(report, x, a, flops_per_token_per_layer=PER_LAYER,
                                                          tokens_per_micro_batch=TOKENS):
                book.add(node_id, direction, tf)
                rel, due = book.observe(node_id, planned, now)
                if due:
                    reported.append((node_id, rel))
    assert [n for n, _ in reported] == ["n10"]
    assert reported[0][1] < 0.5
