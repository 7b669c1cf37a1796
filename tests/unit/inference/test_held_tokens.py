"""Tokens held for inference spot checks (coordinator/inference/replica.py): a checked session
keeps decoding, its tokens reach the client in order once the checks before them passed, and
a session that moved (its chain failed) gets nothing of what was held. No network: a replica
of no stages, its driver never started."""

from __future__ import annotations

import pytest

from swarm.inference.params import SamplingParams
from swarm.inference.session import GenerationState

from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session

pytestmark = pytest.mark.timeout(30)


def setup(max_new_tokens: int = 8, stop: tuple[str, ...] = (), eos: int | None = None):
    r = Replica(model="m", index=0, stages=[], max_sessions=4, on_failure=lambda *a: None, on_finish=lambda *a: None)
    got: list = []
    state = GenerationState(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=max_new_tokens, stop=stop),
                            decode=lambda ids: "".join(chr(ord("a") + i % 26) for i in ids), eos_token_id=eos)
    s = Session(session_id="s1", model="m", state=state, sink=got.append)
    r.attach(s)
    return r, s, got


def tokens(got) -> list[int]:
    return [t for ev in got if ev is not None for t in ev.token_ids]


def test_tokens_after_a_checked_one_wait_and_are_released_in_order():
    r, s, got = setup()
    t1, t2 = object(), object()
    s.pending = [[5, None, False], [6, t1, False], [7, None, False], [8, t2, False], [9, None, False]]
    for ev in r._flush(s):
        r._deliver(s, ev)
    assert tokens(got) == [5] and s.ids() == [1, 2, 5, 6, 7, 8, 9]
    r.release(s, t2)  # a later check passing first releases nothing
    assert tokens(got) == [5]
    r.release(s, t1)
    assert tokens(got) == [5, 6, 7, 8, 9] and not s.pending and s.state.generated == [5, 6, 7, 8, 9]


def test_a_session_that_moved_gets_nothing_of_what_was_held():
    r, s, got = setup()
    t1 = object()
    s.pending = [[6, t1, False]]
    s.replica, s.pending = None, []  # what the engine does when the chain fails
    r.release(s, t1)
    assert tokens(got) == [] and s.state.generated == []


def test_a_session_does_not_generate_past_its_end_while_tokens_are_held():
    r, s, _ = setup(max_new_tokens=3, eos=9)
    t = object()
    s.pending = [[5, t, False], [6, None, False]]
    assert s.runnable()
    s.pending.append([7, None, False])
    assert not s.runnable()  # max_new_tokens reached with what is pending
    r2, s2, _ = setup(eos=9)
    s2.pending = [[5, t, False], [9, None, False]]
    assert not s2.runnable()  # eos pending


def test_tokens_generated_past_a_stop_string_are_dropped_at_release():
    r, s, got = setup(stop=("g",))  # token 6 decodes to "g"
    t = object()
    s.pending = [[5, t, False], [6, None, False], [7, None, False]]
    r.release(s, t)
    assert tokens(got) == [5, 6] and got[-1].finish_reason == "stop" and s.closed and not s.pending


class _Now:
    """An executor that runs at once (the drain) and a fake engine holding one model."""

    def submit(self, fn, *args):
        fn(*args)


class _Other:
    """Another ready chain: records the replays it is given."""

    def __init__(self):
        self.state, self.index, self.num_sessions, self.tasks = "ready", 1, 0, []
        self.node_ids = ["other"]

    def add_check(self, task):
        self.tasks.append(task)
        return True


def _checks(serving, other):
    from types import SimpleNamespace

    from coordinator.inference.checks import Checks

    m = SimpleNamespace(replicas=[serving, other], num_checks=0, num_checks_void=0, num_check_failures=0,
                        record=SimpleNamespace(name="m"))
    engine = SimpleNamespace(_pool=_Now(), get=lambda name: m, _lock=__import__("threading").Lock(),
                             disagg=SimpleNamespace(prefill_indices=lambda m: set()))  # served colocated
    return Checks(engine), m


def test_a_sessions_sampled_steps_ride_one_replay_and_release_in_order():
    """Two sampled steps, one replay naming both rows; each passes on its own row's answer."""
    from swarm.inference.verify import ChainResult, StageCommit

    r, s, got = setup(max_new_tokens=20)
    r.state = "ready"
    other = _Other()
    checks, m = _checks(r, other)
    commit = (StageCommit(node_id="a", first_layer=0, last_layer_excl=2, output=tuple(float(i + 1) for i in range(32))),)
    t1, t2 = object(), object()
    s.pending = [[5, t1, False], [6, None, False], [7, t2, False]]
    checks.hold(r, s, t1, context=(1, 2), token=5, result=ChainResult(replica=0, stages=commit, token=5))
    checks.hold(r, s, t2, context=(1, 2, 5, 6), token=7, result=ChainResult(replica=0, stages=commit, token=7))
    assert not other.tasks and checks.due(s, runnable=True) is False
    assert checks.due(s, runnable=False)  # nothing more would join: replay now
    checks.begin(r, s)
    (task,) = other.tasks
    assert task.entry.token_ids == (1, 2, 5, 6) and task.points == (1, 3) and not s.check_batch
    task.done({1: ChainResult(replica=1, stages=commit, token=5), 3: ChainResult(replica=1, stages=commit, token=7)})
    assert tokens(got) == [5, 6, 7] and m.num_checks == 2 and not s.check_slots


def test_unsent_checks_of_a_session_leaving_its_chain_are_void():
    from swarm.inference.verify import ChainResult

    r, s, got = setup(max_new_tokens=20)
    r.state = "ready"
    other = _Other()
    checks, m = _checks(r, other)
    t1 = object()
    s.pending = [[5, t1, False]]
    checks.hold(r, s, t1, context=(1, 2), token=5, result=ChainResult(replica=0, stages=(), token=5))
    checks.void(s)
    assert not other.tasks and not s.check_slots and not s.check_batch and m.num_checks_void == 1
