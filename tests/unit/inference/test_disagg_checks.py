"""Spot checks of a disaggregated model (coordinator/inference/checks.py, disagg.py): replays
ride on the prefill chains first; a prefill chain's sampled step is replayed at the hand-off and
judged after the move (its token released on the decode chain, or the session replayed when the
prefill was wrong); a decode chain's caches began with pushed KV, so a wrong output there retires
the chain without blaming a node, while a wrong token from right logits still does. No network:
replicas of no stages, drivers never started."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from coordinator.inference.checks import Checks
from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session
from swarm.inference.params import SamplingParams
from swarm.inference.session import GenerationState
from swarm.inference.verify import ChainResult, Reference, StageCommit, judge

pytestmark = pytest.mark.timeout(30)

RIGHT = tuple(float(i + 1) for i in range(32))
WRONG = tuple(-float(i + 1) for i in range(32))


class _Now:
    def submit(self, fn, *args):
        fn(*args)


class _Checker:
    """A ready chain that records the replays it is given."""

    def __init__(self, index: int, num_sessions: int = 0) -> None:
        self.state, self.index, self.num_sessions, self.tasks, self.stages = "ready", index, num_sessions, [], []
        self.node_ids = [f"checker-{index}"]

    def add_check(self, task) -> bool:
        self.tasks.append(task)
        return True


def replica(index: int) -> Replica:
    r = Replica(model="m", index=index, stages=[], max_sessions=4, on_failure=lambda *a: None,
                on_finish=lambda *a: None)
    r.state = "ready"
    return r


def session(got: list, max_new_tokens: int = 8) -> Session:
    state = GenerationState(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=max_new_tokens),
                            decode=lambda ids: "x" * len(ids))
    return Session(session_id="s1", model="m", state=state, sink=got.append)


def engine(replicas, prefill: set[int]):
    m = SimpleNamespace(replicas=list(replicas), num_checks=0, num_checks_void=0, num_check_failures=0,
                        record=SimpleNamespace(name="m", dir=None, digest=""), config=SimpleNamespace(num_layers=2))
    calls = SimpleNamespace(replayed=[], quarantined=[], suspected=[])
    e = SimpleNamespace(_pool=_Now(), get=lambda name: m, _lock=threading.Lock(), suspect=calls.suspected.append,
                        app=SimpleNamespace(registry=SimpleNamespace(
                            quarantine=lambda node, reason: calls.quarantined.append(node) or True)),
                        disagg=SimpleNamespace(prefill_indices=lambda m: set(prefill),
                                               replay=lambda m, s: calls.replayed.append(s)))
    return e, m, calls


def tokens(got) -> list[int]:
    return [t for ev in got if ev is not None for t in ev.token_ids]


def result(index: int, output=RIGHT, token: int = 5, *, node: str = "a", pushed: bool = False) -> ChainResult:
    return ChainResult(replica=index, token=token, cache_pushed=pushed,
                       stages=(StageCommit(node_id=node, first_layer=0, last_layer_excl=2, output=output),))


def test_a_decode_chains_replay_rides_on_the_prefill_chain_first():
    decode, other_decode, prefill = replica(2), _Checker(3, num_sessions=0), _Checker(1, num_sessions=3)
    e, m, _ = engine([prefill, decode, other_decode], prefill={1})
    checks, got = Checks(e), []
    s = session(got)
    decode.attach(s)
    t = object()
    s.pending = [[5, t, False]]
    checks.hold(decode, s, t, context=(1, 2), token=5, result=result(2, pushed=True))
    checks.begin(decode, s)
    assert len(prefill.tasks) == 1 and not other_decode.tasks  # busier, but the prefill chain checks


def _handed_off(prefill_index=0, max_new_tokens=8):
    """A session whose prefill step (token 5) was sampled on the prefill chain, then handed off."""
    pre, checker, dec = replica(prefill_index), _Checker(1), replica(2)
    e, m, calls = engine([pre, checker, dec], prefill={prefill_index})
    checks, got = Checks(e), []
    s = session(got, max_new_tokens)
    pre.attach(s)
    t = object()
    s.pending = [[5, t, False]]
    checks.hold(pre, s, t, context=(1, 2), token=5, result=result(prefill_index, node="p"))
    # what Replica._hand_off does: detach, replay the held step now, then the KV moves
    with pre._cond:
        pre._sessions.remove(s)
    s.replica, s.handed_off_from = None, pre
    checks.begin(pre, s)
    (task,) = checker.tasks
    return checks, s, got, task, pre, dec, m, calls


def test_a_prefill_step_passing_after_the_move_is_released_on_the_decode_chain():
    checks, s, got, task, pre, dec, m, _ = _handed_off()
    dec.attach(s)
    s.pending.append([6, None, False])  # the decode chain went on meanwhile
    assert tokens(got) == []
    task.done({1: result(1, node="c")})
    assert tokens(got) == [5, 6] and m.num_checks == 1


def test_a_check_concluding_while_the_kv_moves_releases_once_attached():
    checks, s, got, task, pre, dec, m, _ = _handed_off()
    task.done({1: result(1, node="c")})  # s.replica is None: the KV is still moving
    assert tokens(got) == []
    dec.attach(s)
    dec.release(s, None)  # what Disagg._move does after attaching
    assert tokens(got) == [5]


def test_a_session_requeued_because_no_decode_chain_had_room_drops_what_it_held():
    """The KV could not move (no decode chain had room): the session goes back to the queue and
    replays from its released tokens (Disagg._requeue). What it held is dropped, as after a failed
    chain: kept, a check concluding while the session waited flagged the token released with no
    chain to flush it, and once the queue attached the session again its pending token counted
    towards max_new_tokens, so it was never runnable: the generation hung until its deadline
    (tests/multiproc/inference/test_slot_cache_nodes.py, about 1 run in 20 on a loaded machine)."""
    from collections import deque

    from coordinator.inference.disagg import Disagg

    checks, s, got, task, pre, dec, m, _ = _handed_off(max_new_tokens=1)
    m.waiting = deque()
    d = Disagg(SimpleNamespace(_lock=threading.RLock(),
                               app=SimpleNamespace(clock=SimpleNamespace(monotonic=lambda: 0.0))))
    d._requeue(m, s)
    assert s.pending == [] and s.kv_pos == 0 and list(m.waiting) == [s]
    task.done({1: result(1, node="c")})  # the held step's check concludes while it waits: nothing to release
    assert tokens(got) == []
    pre.attach(s)  # the queue gives it a chain again
    assert s.runnable()  # so its driver prefills it again and the token comes (computed anew)


def test_a_wrong_prefill_retires_its_chain_quarantines_its_node_and_replays_the_session():
    checks, s, got, task, pre, dec, m, calls = _handed_off()
    dec.attach(s)
    checks.referee.reference = lambda *a, **kw: Reference(outputs={2: RIGHT}, tokens=frozenset({5}))
    # the prefill chain's own commitment was wrong: rebuild its slot's result as the faulty one
    with s.check_lock:
        s.check_slots[0][4] = result(0, output=WRONG, node="p")
    failed = []
    pre.fail = failed.append
    task.done({1: result(1, node="c")})
    assert calls.quarantined == ["p"] and calls.replayed == [s] and len(failed) == 1
    assert tokens(got) == []  # the wrong token never reached the client


def test_pushed_caches_blame_nobody_for_a_wrong_output_but_a_wrong_token_still_blames():
    ref = Reference(outputs={2: RIGHT}, tokens=frozenset({5}))
    fresh = judge(result(2, output=WRONG, node="d"), ref)
    assert fresh.guilty == "d"  # its own caches: its output is its own
    pushed = judge(result(2, output=WRONG, node="d", pushed=True), ref)
    assert not pushed.ok and pushed.guilty is None and "pushed" in pushed.reason
    token = judge(result(2, output=RIGHT, token=9, node="d", pushed=True), ref)
    assert token.guilty == "d"  # right logits, wrong token: the last stage chose it


def test_a_retired_decode_chain_with_pushed_caches_has_its_nodes_avoided():
    decode, prefill = replica(2), _Checker(1)
    e, m, calls = engine([prefill, decode], prefill={1})
    checks, got = Checks(e), []
    checks.referee.reference = lambda *a, **kw: Reference(outputs={2: RIGHT}, tokens=frozenset({5}))
    s = session(got)
    decode.attach(s)
    t = object()
    s.pending = [[5, t, False]]
    checks.hold(decode, s, t, context=(1, 2), token=5, result=result(2, output=WRONG, node="d", pushed=True))
    failed = []
    decode.fail = failed.append
    checks.begin(decode, s)
    prefill.tasks[0].done({1: result(1, node="p")})
    assert calls.quarantined == [] and "d" in calls.suspected and len(failed) == 1 and tokens(got) == []
