"""Check windows (coordinator/inference/checks.py ``window_tokens``, ``window_step``): the unit
that inference spot checks sample. Seeded simulations of the driver's use of them state what the
default costs (replay tokens per generated token) and how soon a node altering half its steps is
caught, with no network."""

from __future__ import annotations

import random

import pytest

from coordinator.inference.checks import (MAX_REPLAY_POINTS, MAX_WINDOW_TOKENS, MIN_WINDOW_TOKENS,
                                          replay_due, window_step, window_tokens)

pytestmark = pytest.mark.timeout(30)


def test_a_window_is_as_long_as_its_context_within_bounds():
    assert window_tokens(1, 1000) == MIN_WINDOW_TOKENS
    assert window_tokens(MIN_WINDOW_TOKENS + 5, 1000) == MIN_WINDOW_TOKENS + 5
    assert window_tokens(10_000, 1000) == MAX_WINDOW_TOKENS
    assert MAX_WINDOW_TOKENS <= MAX_REPLAY_POINTS  # one replay checks a whole window
    with pytest.raises(ValueError, match="at least one token"):
        window_tokens(0, 10)
    with pytest.raises(ValueError, match="0 steps left"):
        window_tokens(10, 0)


def test_a_window_takes_in_a_short_rest_of_the_session():
    assert window_tokens(10, 48) == 48  # 16 steps would be left after 32: one window, one replay
    assert window_tokens(60, 64) == 64
    assert window_tokens(10, 64) == MIN_WINDOW_TOKENS  # 32 left after it: a window of their own
    assert window_tokens(10, 500) == MIN_WINDOW_TOKENS
    assert window_tokens(100, 70) == MAX_WINDOW_TOKENS  # never past MAX_WINDOW_TOKENS
    assert window_tokens(10, 3) == MIN_WINDOW_TOKENS  # ends with the session anyway


def test_a_window_starts_at_a_reset_at_the_first_step_and_after_the_previous_one():
    kw = dict(steps_left=1000)
    assert window_step(position=9, window_end=None, reset=True, **kw) == 9 + MIN_WINDOW_TOKENS
    assert window_step(position=20, window_end=41, reset=False, **kw) is None  # inside the window
    assert window_step(position=41, window_end=41, reset=False, **kw) == 41 + 42  # context 42 tokens
    assert window_step(position=20, window_end=41, reset=True, **kw) == 20 + MIN_WINDOW_TOKENS  # a new chain
    assert window_step(position=500, window_end=None, reset=False, **kw) == 500 + MAX_WINDOW_TOKENS


def _simulate(p: float, *, prompt: int, new_tokens: int, rng: random.Random, faulty_rate: float = 0.0):
    """One session as the driver runs it: windows drawn with ``p``; every step of a checked
    window held and replayed together (``replay_due``). Returns (replay tokens, caught: a replay
    covered a step the faulty node altered, steps until then)."""
    window_end, checked, batch = None, False, []
    replay_tokens, caught_at = 0, None
    for k in range(new_tokens):
        pos = prompt - 1 + k  # the step's last row
        end = window_step(position=pos, window_end=window_end, reset=k == 0, steps_left=new_tokens - k)
        if end is not None:
            window_end, checked = end, rng.random() < p
        wrong = rng.random() < faulty_rate
        if checked:
            batch.append((pos, wrong))
        if batch and replay_due(num_points=len(batch), first_position=batch[0][0], position=pos + 1,
                                runnable=k < new_tokens - 1,
                                window_tokens=window_end - batch[0][0]):
            replay_tokens += batch[-1][0] + 1  # a prefill of the context up to the latest held step
            if caught_at is None and any(w for _, w in batch):
                caught_at = k + 1
            batch = []
    assert not batch  # every held step was replayed by the session's end
    return replay_tokens, caught_at


def test_a_checked_window_is_replayed_once_and_holds_at_most_a_window():
    for _ in range(50):
        window_end, batch, sent = None, [], []
        for k in range(200):
            pos = 9 + k
            end = window_step(position=pos, window_end=window_end, reset=k == 0, steps_left=200 - k)
            if end is not None:
                window_end = end
                assert not batch  # the previous window's replay was sent at its last step
            batch.append(pos)
            if replay_due(num_points=len(batch), first_position=batch[0], position=pos + 1, runnable=k < 199,
                          window_tokens=window_end - batch[0]):
                assert len(batch) <= MAX_WINDOW_TOKENS
                sent.append(batch)
                batch = []
        assert sum(len(b) for b in sent) == 200
        assert len(sent) <= 200 // MIN_WINDOW_TOKENS + 1  # one replay per window


@pytest.mark.parametrize("prompt,new_tokens", [(10, 48), (10, 200), (60, 64)])
def test_the_default_costs_about_p_replay_tokens_per_generated_token(prompt, new_tokens):
    """At p = 0.05 the expected replay tokens per generated token stay below 2.5 p while the
    context is at most about MAX_WINDOW_TOKENS (per-step sampling with a replay per 32 steps: ~1.2)."""
    rng, p = random.Random(11), 0.05
    replay = sum(_simulate(p, prompt=prompt, new_tokens=new_tokens, rng=rng)[0] for _ in range(4000))
    per_token = replay / (4000 * new_tokens)
    assert 0.2 * p < per_token < 2.5 * p, per_token


def test_a_node_altering_half_its_steps_is_caught_in_every_checked_window():
    """Every step of a checked window is compared: a window of a node at wrong-tokens=0.5 escapes
    only if none of its 32+ steps was altered. So the share of its sessions caught is the share
    of sessions with a checked window, and the catch comes at that window's replay."""
    rng, p, n = random.Random(5), 0.05, 4000
    caught = [_simulate(p, prompt=10, new_tokens=48, rng=rng, faulty_rate=0.5)[1] for _ in range(n)]
    share = sum(c is not None for c in caught) / n
    assert 0.035 < share < 0.07, share  # p: a 48-token session is one window
    assert all(c is None or c >= MIN_WINDOW_TOKENS for c in caught)  # at the window's end


def test_the_driver_draws_once_per_window_and_none_while_no_check_can_run():
    from coordinator.inference.checks import Checks
    from coordinator.inference.sessions import Session
    from swarm.inference.params import SamplingParams
    from swarm.inference.session import GenerationState
    from swarm.inference.stage_runtime import StepEntry

    state = GenerationState(prompt_ids=list(range(10)), params=SamplingParams(max_new_tokens=200),
                            decode=lambda ids: "", eos_token_id=None)
    s = Session(session_id="s", model="m", state=state, sink=lambda ev: None)
    draws = []

    def draw() -> bool:
        draws.append(len(s.pending))
        return True

    def step(k: int, *, checking: bool = True) -> bool:
        e = (StepEntry(session_id="s", start_position=0, num_tokens=10, token_ids=tuple(range(10)), reset=True)
             if k == 0 else StepEntry(session_id="s", start_position=9 + k, num_tokens=1, token_ids=(1,)))
        got = Checks.checked_step(s, e, checking=checking, draw=draw)
        s.pending.append([1, None, False])
        return got

    assert all(step(k) for k in range(MIN_WINDOW_TOKENS + 1))
    assert draws == [0, MIN_WINDOW_TOKENS]  # the prefill's window, then the next one
    assert not step(MIN_WINDOW_TOKENS + 1, checking=False) and s.window_end is None
    assert step(MIN_WINDOW_TOKENS + 2) and draws[-1] == MIN_WINDOW_TOKENS + 2  # a new window once checks can run
