"""Check windows replayed on the coordinator's referee when no other chain can replay them
(swarm/inference/referee.py: the budget and the decision; coordinator/inference/checks.py and
referee.py: the replay). Fake clock, seeded generators, a tiny checkpoint built in the test; no
network, no sleeps."""

from __future__ import annotations

import random
import threading
from collections import deque
from types import SimpleNamespace

import pytest

from coordinator.inference.checks import Checks
from coordinator.inference.referee import Referee, RefereeReplays
from swarm.clock import FakeClock
from swarm.inference.params import SamplingParams
from swarm.inference.referee import Checker, TokenBudget, choose_checker, referee_tokens_per_s
from swarm.inference.verify import ChainResult, StageCommit, resolve_by_reference
from swarm.model.checkpoint import load_config
from swarm.model.testing import make_tiny_checkpoint

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ the budget and the decision
def test_a_budget_starts_full_admits_into_debt_and_refills_at_its_rate():
    clock = FakeClock()
    b = TokenBudget(tokens_per_s=10.0, burst_s=3.0)  # capacity 30
    assert b.take(25, clock.monotonic()) and b.level == 5
    assert b.take(40, clock.monotonic()) and b.level == -35  # a long window is admitted, into debt
    assert not b.take(1, clock.monotonic()) and b.level == -35  # refused: nothing charged
    clock.advance(3.5)
    assert not b.admits(clock.monotonic())  # level 0: still nothing
    clock.advance(0.1)
    assert b.take(1, clock.monotonic())
    clock.advance(1000)
    assert b.admits(clock.monotonic()) and b.level == 30  # saved up to burst_s only


def test_a_budget_bounds_the_tokens_admitted_over_any_span():
    rng = random.Random(13)
    for _ in range(20):
        clock = FakeClock()
        rate, burst = rng.uniform(0.5, 50), rng.uniform(1, 60)
        b = TokenBudget(tokens_per_s=rate, burst_s=burst)
        start, admitted, biggest = clock.monotonic(), 0, 0
        for _ in range(300):
            clock.advance(rng.expovariate(1.0))
            cost = rng.randint(1, 256)
            if b.take(cost, clock.monotonic()):
                admitted, biggest = admitted + cost, max(biggest, cost)
        assert admitted <= rate * (clock.monotonic() - start + burst) + biggest


def test_a_budget_of_zero_admits_nothing_and_bad_budgets_are_refused():
    assert not TokenBudget(tokens_per_s=0.0).take(1, 0.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            TokenBudget(tokens_per_s=bad)
    with pytest.raises(ValueError):
        TokenBudget(tokens_per_s=1.0).take(0, 0.0)


def test_the_default_rate_follows_the_models_size():
    assert referee_tokens_per_s(7_000_000_000) == pytest.approx(20e9 / 14e9)
    assert referee_tokens_per_s(1_000_000, flops_per_s=2e6) == pytest.approx(1.0)
    assert referee_tokens_per_s(10, flops_per_s=0) == 0
    with pytest.raises(ValueError):
        referee_tokens_per_s(0)


@pytest.mark.parametrize("room,enabled,admits,queued,want", [
    (True, True, True, 0, Checker.CHAIN),  # a chain with room first, always
    (True, False, False, 9, Checker.CHAIN),
    (False, True, True, 0, Checker.REFEREE),
    (False, True, True, 3, Checker.REFEREE),
    (False, True, True, 4, Checker.VOID),  # backlog full
    (False, True, False, 0, Checker.VOID),  # over budget: void, not waiting
    (False, False, True, 0, Checker.VOID),  # referee off for the model
])
def test_where_a_window_is_replayed(room, enabled, admits, queued, want):
    assert choose_checker(chain_has_room=room, referee_enabled=enabled, budget_admits=admits,
                          referee_queued=queued, max_queue=4) is want


# ------------------------------------------------------------------ the replay and the judgement
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    make_tiny_checkpoint(d, "llama", num_layers=4, hidden_size=64, num_heads=4, seed=3)
    return d


class _Now:
    def submit(self, fn, *args):
        fn(*args)


class _Held:
    """An executor that keeps what it is given until ``run``."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, *args):
        self.jobs.append((fn, args))

    def run(self):
        jobs, self.jobs = self.jobs, []
        for fn, args in jobs:
            fn(*args)


CONTEXT = (1, 5, 9, 3, 7, 11)
POINTS = (3, 5)  # two held steps of one window: rows 3 and 5
PARAMS = SamplingParams(max_new_tokens=8)  # greedy


def _setup(ckpt, *, tokens_per_s=1e6, executor=None, clock=None):
    cfg = load_config(ckpt)
    released, failed, quarantined = [], [], []
    serving = SimpleNamespace(index=0, state="ready", model="m", release=lambda s, t: released.append(t),
                              fail=lambda reason: failed.append(reason), node_ids=["a", "b"], num_sessions=1)
    m = SimpleNamespace(record=SimpleNamespace(name="m", dir=ckpt, digest="d" * 64), config=cfg, replicas=[serving],
                        num_checks=0, num_check_failures=0, num_checks_void=0, num_referee_checks=0,
                        num_referee_void=0)
    registry = SimpleNamespace(quarantine=lambda nid, reason: quarantined.append((nid, reason)) or True)
    engine = SimpleNamespace(_pool=_Now(), get=lambda name: m, _lock=threading.Lock(), suspect=lambda nid: None,
                             disagg=SimpleNamespace(prefill_indices=lambda m: set()), app=SimpleNamespace(registry=registry))
    checks = Checks(engine)
    checks.replays = RefereeReplays(checks.referee, clock or FakeClock(), tokens_per_s=tokens_per_s,
                                    executor=executor or _Now())
    s = SimpleNamespace(id="s1", model="m", replica=serving, handed_off_from=None, check_lock=threading.Lock(),
                        check_slots=deque(), check_batch=[], state=SimpleNamespace(params=PARAMS))
    return checks, m, serving, s, SimpleNamespace(released=released, failed=failed, quarantined=quarantined)


def _chain(refs, p, *, bad_stage: int | None = None) -> ChainResult:
    """The serving chain's answer at row ``p``: stages 0-2 and 2-4, honest (the recomputation's own
    sketches) or with ``bad_stage``'s output off by its own scale."""
    out = {b: list(refs[p].outputs[b]) for b in (2, 4)}
    if bad_stage is not None:
        b = (2, 4)[bad_stage]
        out[b] = [2 * v + 1 for v in out[b]]
    stages = (StageCommit(node_id="a", first_layer=0, last_layer_excl=2, output=tuple(out[2])),
              StageCommit(node_id="b", first_layer=2, last_layer_excl=4, input=tuple(out[2]), output=tuple(out[4])))
    return ChainResult(replica=0, stages=stages, token=min(refs[p].tokens))


def _hold_window(checks, serving, s, refs, *, bad_stage=None):
    tickets = [object() for _ in POINTS]
    for t, p in zip(tickets, POINTS):
        chain = _chain(refs, p, bad_stage=bad_stage if p == POINTS[-1] else None)
        checks.hold(serving, s, t, context=CONTEXT[:p + 1], token=chain.token, result=chain)
    return tickets


def _refs(ckpt):
    cfg = load_config(ckpt)
    return Referee().references(ckpt, "d" * 64, num_layers=cfg.num_layers, boundaries={2}, context=CONTEXT,
                                points=POINTS, params=PARAMS)


def test_one_prefill_recomputes_every_row_as_a_prefix_would(ckpt):
    cfg = load_config(ckpt)
    refs, referee = _refs(ckpt), Referee()
    for p in POINTS:
        alone = referee.reference(ckpt, "d" * 64, num_layers=cfg.num_layers, boundaries={2}, context=CONTEXT[:p + 1],
                                  params=PARAMS)
        assert alone.tokens == refs[p].tokens
        assert all(max(abs(x - y) for x, y in zip(alone.outputs[b], refs[p].outputs[b])) < 1e-4 for b in (2, 4))
    with pytest.raises(ValueError):
        referee.references(ckpt, "d" * 64, num_layers=cfg.num_layers, boundaries={2}, context=CONTEXT,
                           points=(len(CONTEXT),), params=PARAMS)


def test_an_honest_window_without_another_chain_is_checked_by_the_referee_and_released(ckpt):
    checks, m, serving, s, seen = _setup(ckpt)
    assert checks.can_check(serving)  # one replica, but the referee can check it
    tickets = _hold_window(checks, serving, s, _refs(ckpt))
    checks.begin(serving, s)
    assert seen.released == tickets and not seen.failed and not seen.quarantined
    assert (m.num_checks, m.num_referee_checks, m.num_check_failures, m.num_checks_void) == (2, 2, 0, 0)
    assert not s.check_slots


def test_a_wrong_stage_is_quarantined_and_its_chain_failed_by_the_referee(ckpt):
    checks, m, serving, s, seen = _setup(ckpt)
    tickets = _hold_window(checks, serving, s, _refs(ckpt), bad_stage=1)
    checks.begin(serving, s)
    assert seen.released == tickets[:1]  # the first step was right; the wrong one is withheld
    assert [nid for nid, _ in seen.quarantined] == ["b"] and "inference spot check" in seen.quarantined[0][1]
    assert len(seen.failed) == 1 and m.num_check_failures == 1 and m.num_referee_checks == 2


def test_over_budget_the_window_is_void_and_counted(ckpt):
    clock = FakeClock()
    checks, m, serving, s, seen = _setup(ckpt, tokens_per_s=1.0, clock=clock)  # 30 tokens saved at most
    refs = _refs(ckpt)
    for _ in range(5):  # 6-token windows: 30 / 6 = 5 fit
        _hold_window(checks, serving, s, refs)
        checks.begin(serving, s)
    assert m.num_referee_checks == 10 and m.num_referee_void == 0
    tickets = _hold_window(checks, serving, s, refs)
    checks.begin(serving, s)
    assert m.num_referee_void == 1 and m.num_checks_void == 2 and seen.released[-2:] == tickets
    clock.advance(6.0)  # refilled enough for one more
    _hold_window(checks, serving, s, refs)
    checks.begin(serving, s)
    assert m.num_referee_checks == 12 and m.num_referee_void == 1


def test_the_replay_runs_on_the_worker_not_the_calling_thread(ckpt):
    held = _Held()
    checks, m, serving, s, seen = _setup(ckpt, executor=held)
    tickets = _hold_window(checks, serving, s, _refs(ckpt))
    checks.begin(serving, s)  # returns with the replay queued, nothing recomputed yet
    assert not seen.released and m.num_checks == 0 and len(held.jobs) == 1
    held.run()
    assert seen.released == tickets and m.num_referee_checks == 2


def test_the_referees_backlog_is_bounded(ckpt):
    held = _Held()
    checks, m, serving, s, seen = _setup(ckpt, executor=held)
    for _ in range(5):
        _hold_window(checks, serving, s, _refs(ckpt))
        checks.begin(serving, s)
    assert len(held.jobs) == 4 and m.num_referee_void == 1  # MAX_REFEREE_QUEUE waiting, the fifth void
    held.run()
    assert m.num_referee_checks == 8


def test_without_a_referee_budget_a_lone_chain_is_not_checked(ckpt):
    checks, m, serving, s, _ = _setup(ckpt, tokens_per_s=0.0)
    assert not checks.can_check(serving)


def test_resolve_by_reference_blames_the_stage_whose_own_output_is_wrong(ckpt):
    refs = _refs(ckpt)
    p = POINTS[0]
    assert resolve_by_reference(_chain(refs, p), refs[p]).release
    out = resolve_by_reference(_chain(refs, p, bad_stage=0), refs[p])
    assert not out.release and out.retire == (0,) and [n for n, _ in out.quarantine] == ["a"] and out.disputed


def test_a_model_too_large_for_the_coordinators_memory_is_never_loaded_by_the_referee(ckpt):
    cfg = load_config(ckpt)
    m = SimpleNamespace(record=SimpleNamespace(name="m", digest="d" * 64), config=cfg)
    fp32 = 4 * cfg.num_parameters(include_embeddings=True)
    fits = RefereeReplays(Referee(), FakeClock(), executor=_Now(), memory_bytes=8 * fp32)
    assert fits.enabled(m) and fits.rate(m) > 0
    small = RefereeReplays(Referee(), FakeClock(), executor=_Now(), memory_bytes=2 * fp32)  # 50%: over the 25% share
    assert not small.enabled(m)
    assert small.submit(m, 10, lambda: pytest.fail("the referee must not replay a model it cannot hold")) is False
