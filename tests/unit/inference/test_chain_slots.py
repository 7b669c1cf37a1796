"""A chain's session slots (coordinator/inference/replica.py ``_used``): every session its stages
hold or are promised counts, so a stage is never asked for more than ``max_sessions``."""

from __future__ import annotations

import pytest

from swarm.inference.params import SamplingParams
from swarm.inference.session import GenerationState

from coordinator.inference.replica import Replica
from coordinator.inference.sessions import Session

pytestmark = pytest.mark.timeout(30)


def _session(sid: str) -> Session:
    state = GenerationState(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=4), decode=lambda ids: "x",
                            eos_token_id=None)
    return Session(session_id=sid, model="m", state=state, sink=lambda ev: None)


def _chain(max_sessions: int) -> tuple[Replica, list]:
    freed: list = []
    r = Replica(model="m", index=0, stages=[], max_sessions=max_sessions, on_failure=lambda *a: None,
                on_finish=lambda rep, s: freed.append(s))
    r.state = "ready"
    return r, freed


def test_moving_kv_check_replays_and_closing_sessions_all_take_slots():
    r, _ = _chain(3)
    r.attach(_session("a"))
    assert r.reserve()  # a session's KV moving in
    assert r.add_check(object())  # a check replay for the next step
    assert not r.has_room() and not r.reserve() and not r.add_check(object())
    r.unreserve()  # the move failed (or the session attached: then it holds the slot itself)
    assert r.has_room()
    r.attach(_session("b"))
    assert not r.has_room()
    r._drop(r._sessions[0])  # finished: closed on the stages only by the next step
    assert not r.has_room(), "a closed session holds its slot until the stages freed it"


def test_a_step_that_frees_slots_tells_the_engine():
    r, freed = _chain(1)
    r.attach(_session("a"))
    r._drop(r._sessions[0])
    with r._cond:  # what the driver does when it takes the closes for a step
        closing, r._closing = r._closing, []
        r._in_step = len(closing)
    assert not r.has_room()  # the close is on its way to the stages
    r._close_idle = lambda ids: None  # no stages here: the idle close reaches nobody
    r._drive_once([], closing, link=None, tasks=[])
    assert r._in_step == 0 and r.has_room() and freed == [None]
    r.unreserve()  # more unreserves than reserves never count below zero
    assert r._incoming == 0
