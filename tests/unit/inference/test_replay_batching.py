"""When a session's held sampled steps are replayed (coordinator/inference/checks.py
``replay_due``) and which replay rows a stage commits to (node/inference/commitments.py)."""

from __future__ import annotations

import random

import pytest

from coordinator.inference.checks import MAX_REPLAY_POINTS, REPLAY_WINDOW_TOKENS, replay_due
from node.inference.commitments import MAX_POINTS_PER_ENTRY, commit_points
from swarm.inference.stage_runtime import StepEntry
from swarm.proto.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def test_nothing_to_replay_is_never_due():
    assert not replay_due(num_points=0, first_position=0, position=500, runnable=False)


def test_due_once_the_oldest_held_step_reaches_the_window():
    kw = dict(num_points=2, first_position=40, window_tokens=32, runnable=True)
    assert not replay_due(position=71, **kw)
    assert replay_due(position=72, **kw)


def test_due_at_once_when_the_session_cannot_generate_further():
    assert replay_due(num_points=1, first_position=40, position=41, runnable=False)


def test_not_due_near_the_end_while_the_session_still_generates():
    """A replay sent a few steps before the end would need a second one for the steps after it."""
    assert not replay_due(num_points=3, first_position=40, position=43, runnable=True)


def test_due_when_the_batch_is_full():
    assert replay_due(num_points=MAX_REPLAY_POINTS, first_position=40, position=41, runnable=True)


def test_a_simulated_session_sends_few_replays_and_holds_no_token_past_the_window():
    """Seeded: sessions of 48 tokens sampled at 0.05. Every sampled step is in exactly one
    replay, sent at most REPLAY_WINDOW_TOKENS steps after it; far fewer replays than samples."""
    rng = random.Random(7)
    samples = replays = 0
    for _ in range(200):
        batch: list[int] = []
        for pos in range(10, 58):  # the step ending at row pos
            if rng.random() < 0.05:
                batch.append(pos)
                samples += 1
            runnable = pos < 57
            if replay_due(num_points=len(batch), first_position=batch[0] if batch else 0, position=pos + 1,
                          runnable=runnable):
                assert pos + 1 - batch[0] <= REPLAY_WINDOW_TOKENS
                replays += 1
                batch = []
        assert not batch
    assert samples > 300 and replays < 0.6 * samples


def test_a_stage_commits_only_to_rows_the_entry_carries():
    entries = [StepEntry(session_id="a", start_position=0, num_tokens=10, token_ids=tuple(range(10)), reset=True),
               StepEntry(session_id="b", start_position=7, num_tokens=1, token_ids=(1,))]
    pts = [pb.ServeCommitPoints(session_id="a", positions=[9, 3, 3, 10, -1]),
           pb.ServeCommitPoints(session_id="b", positions=[6, 7]),
           pb.ServeCommitPoints(session_id="zz", positions=[1])]
    assert commit_points(pts, entries) == {0: [3, 9], 1: [0]}


def test_a_stage_caps_the_points_per_entry():
    n = MAX_POINTS_PER_ENTRY + 50
    entries = [StepEntry(session_id="a", start_position=0, num_tokens=n, token_ids=(1,) * n, reset=True)]
    got = commit_points([pb.ServeCommitPoints(session_id="a", positions=list(range(n)))], entries)
    assert len(got[0]) == MAX_POINTS_PER_ENTRY
