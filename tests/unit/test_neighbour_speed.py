"""Neighbour-seen speeds and slow nodes (coordinator/jobs/speed.py): pure, fake clock, seeded."""

from __future__ import annotations

import random

import pytest

from coordinator.jobs.speed import (MIN_SAMPLES, SLOW_WINDOW_S, SlowState, SpeedBook, assess, neighbour_views,
                                    relative_speeds)

pytestmark = pytest.mark.timeout(30)


def assignments(num_stages=2, num_replicas=1):
    return [{"node_id": f"n{s}{r}", "stage": s, "replica": r} for s in range(num_stages) for r in range(num_replicas)]


def test_a_report_times_the_previous_stage_forward_and_the_next_backward():
    a = assignments(3, 2)
    r = {"step_s": 2.0, "wait_activation_s": 0.5, "wait_gradient_s": 1.0}
    assert neighbour_views(r, a[3], a) == [("n01", "forward", 0.25), ("n21", "backward", 0.5)]


def test_a_node_is_never_timed_by_itself_nor_by_bad_figures():
    a = assignments(2, 1)
    for r in ({"step_s": 0.0, "wait_activation_s": 0.1}, {"step_s": 1.0, "wait_activation_s": float("nan")},
              {"step_s": 1.0, "wait_activation_s": -1.0}, {"step_s": float("inf"), "wait_activation_s": 1.0}):
        assert neighbour_views(r, a[1], a) == []
    # the first stage has no previous stage: its activation wait names nobody
    assert neighbour_views({"step_s": 1.0, "wait_activation_s": 0.5}, a[0], a) == []
    # a node holding two stages of a replica is not its own neighbour
    same = [{"node_id": "x", "stage": 0, "replica": 0}, {"node_id": "x", "stage": 1, "replica": 0}]
    assert neighbour_views({"step_s": 1.0, "wait_activation_s": 0.5}, same[1], same) == []


def test_relative_speed_cancels_the_waits_every_node_imposes():
    # the pipeline's fill and drain make every neighbour wait ~20%: all are "as planned"
    assert relative_speeds({"a": 0.2, "b": 0.2, "c": 0.2}) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    # c keeps its neighbours waiting 80% of their step: a quarter of the others' pace
    rel = relative_speeds({"a": 0.2, "b": 0.2, "c": 0.8})
    assert rel["c"] == pytest.approx(0.25) and rel["a"] == pytest.approx(0.8 / 0.5)
    assert relative_speeds({"a": 0.1}) == {}


def test_slow_only_when_sustained_and_reported_once():
    s, fired = SlowState(), []
    for k in range(40):
        s, due = assess(s, 0.3, 1000.0 + k)
        fired.append(due)
    assert fired.count(True) == 1
    first = fired.index(True)
    assert first >= MIN_SAMPLES - 1 and first >= SLOW_WINDOW_S
    # a recovery in between restarts the run of slow observations
    s = SlowState()
    for k in range(30):
        s, due = assess(s, 0.3 if k % MIN_SAMPLES else 0.9, float(k))
        assert not due


def _simulate(num_stages, num_replicas, slow: dict[str, float], steps=60, seed=3):
    """Seeded: each stage does the same planned work per step; a node with factor F takes F times
    as long. Every stage runs at its replica's slowest pace; a stage waits for its previous stage
    in proportion to how much slower the stages up to it are, and for its next stage likewise."""
    rng = random.Random(seed)
    a = assignments(num_stages, num_replicas)
    by = {(x["stage"], x["replica"]): x for x in a}
    book, reported, rels = SpeedBook(), [], {}
    busy = lambda s, r: slow.get(by[(s, r)]["node_id"], 1.0)  # noqa: E731
    for step in range(steps):
        for x in a:
            s, r = x["stage"], x["replica"]
            pace = max(busy(k, r) for k in range(num_stages)) * 1.2  # + fill and drain
            up = max([busy(k, r) for k in range(s)], default=0.0)  # activations come at the upstream's pace
            down = max([busy(k, r) for k in range(s + 1, num_stages)], default=0.0)
            noise = lambda: rng.uniform(0.9, 1.1)  # noqa: E731
            report = {"step_s": pace,
                      "wait_activation_s": max(0.0, up - busy(s, r)) + 0.1 * noise() if s > 0 else 0.0,
                      "wait_gradient_s": max(0.0, down - busy(s, r)) + 0.1 * noise() if s < num_stages - 1 else 0.0}
            for node_id, direction, q in neighbour_views(report, x, a):
                book.add(node_id, direction, q)
                rel, due = book.observe(node_id, 100.0 + step)
                rels[node_id] = rel
                if due:
                    reported.append(node_id)
    return reported, rels


@pytest.mark.parametrize("num_stages,num_replicas,who", [(2, 1, "n00"), (2, 1, "n10"), (3, 2, "n10"), (3, 1, "n20")])
def test_a_slowed_node_is_found_and_its_neighbours_are_not_blamed(num_stages, num_replicas, who):
    reported, rels = _simulate(num_stages, num_replicas, {who: 4.0})
    assert reported == [who]
    assert rels[who] < 0.5 and all(v > 0.5 for n, v in rels.items() if n != who)


def test_an_honest_job_reports_nobody():
    reported, rels = _simulate(3, 2, {})
    assert reported == [] and all(0.8 < v < 1.25 for v in rels.values())
