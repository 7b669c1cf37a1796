"""Probation (swarm/inference/probation.py; the book: coordinator/inference/probation.py): a chain
retired by a check without a culprit puts its nodes on probation, their chains are then checked at
every window, N passed windows end it, and only a check's blame quarantines."""

import sqlite3
from types import SimpleNamespace

import pytest

from coordinator.inference.checks import Checks
from coordinator.inference.probation import Probations
from coordinator.inference.store import ModelStore
from swarm.clock import FakeClock
from swarm.inference.probation import (MAX_DOUBLINGS, PROBATION_WINDOWS, NodeProbation, active, after_check,
                                       on_probation, windows_required)
from swarm.inference.verify import ChainResult, Outcome, StageCommit

pytestmark = pytest.mark.timeout(30)


def chain(replica: int, *nodes: str, fresh: bool = True, pushed: bool = False) -> ChainResult:
    return ChainResult(replica=replica, token=1, fresh=fresh, cache_pushed=pushed, stages=tuple(
        StageCommit(node_id=n, first_layer=k, last_layer_excl=k + 1) for k, n in enumerate(nodes)))


SERVING, CHECKER = chain(0, "a", "bad"), chain(1, "c", "d")
RETIRED = Outcome(release=False, retire=(0,), disputed=True, reason="stage 1 not blamed (unchecked steps)")
PASSED = Outcome(release=True)


def test_a_chain_retired_without_a_culprit_puts_only_its_own_nodes_on_probation():
    ch = after_check({}, serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False, now_s=5.0)
    assert set(ch.entered) == {"a", "bad"} and active(ch.book) == {"a", "bad"}  # the checker's nodes are not
    assert ch.book["bad"].strikes == 1 and ch.book["bad"].since_s == 5.0 and "not blamed" in ch.book["bad"].reason
    assert on_probation(ch.book, ["c", "bad", "d"]) == ["bad"]


def test_a_culprit_is_quarantined_and_its_chain_mates_are_not_put_on_probation():
    book = after_check({}, serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False, now_s=0).book
    caught = Outcome(release=False, retire=(0,), disputed=True, quarantine=(("bad", "wrong output"),))
    ch = after_check(book, serving=SERVING, checker=CHECKER, outcome=caught, window_done=False, now_s=1)
    assert "bad" not in ch.book and ch.left == ("bad",)  # quarantine supersedes probation
    assert ch.book["a"].strikes == 1  # unchanged: a culprit was found, its neighbour is not suspected again
    fresh = after_check({}, serving=SERVING, checker=CHECKER, outcome=caught, window_done=False, now_s=1)
    assert fresh.book == {} and fresh.entered == ()


def test_a_checker_chain_retired_without_a_culprit_is_put_on_probation_too():
    out = Outcome(release=True, retire=(1,), disputed=True, reason="one of c, d lies about the hop")
    ch = after_check({}, serving=SERVING, checker=CHECKER, outcome=out, window_done=True, now_s=0)
    assert active(ch.book) == {"c", "d"}


def test_a_void_check_changes_nothing():
    ch = after_check({}, serving=SERVING, checker=None, outcome=RETIRED, window_done=True, now_s=0)
    assert ch.book == {} and ch.entered == ch.left == ()


def test_n_passed_fresh_windows_end_probation_and_only_windows_count():
    book = after_check({}, serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False, now_s=0).book
    serving = chain(2, "a", "e")  # "a" serves again on a new chain
    for _ in range(3):  # steps inside a window: no window passed yet
        book = after_check(book, serving=serving, checker=CHECKER, outcome=PASSED, window_done=False, now_s=0).book
    assert book["a"].passed == 0
    left = ()
    for k in range(PROBATION_WINDOWS):
        assert "a" in active(book), k
        ch = after_check(book, serving=serving, checker=CHECKER, outcome=PASSED, window_done=True, now_s=0)
        book, left = ch.book, ch.left
    assert left == ("a",) and "a" not in active(book) and "bad" in active(book)
    assert book["a"].strikes == 1  # kept: a later probation is longer


def test_windows_where_a_later_stage_could_not_be_blamed_do_not_count():
    book = after_check({}, serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False, now_s=0).book
    for serving in (chain(2, "e", "bad", fresh=False), chain(2, "e", "bad", pushed=True)):
        book = after_check(book, serving=serving, checker=CHECKER, outcome=PASSED, window_done=True, now_s=0).book
    assert book["bad"].passed == 0


def test_every_new_probation_asks_twice_the_windows_up_to_a_cap():
    assert windows_required(1) == PROBATION_WINDOWS and windows_required(2) == 2 * PROBATION_WINDOWS
    assert windows_required(MAX_DOUBLINGS + 1) == windows_required(MAX_DOUBLINGS + 7)
    book = {"bad": NodeProbation(strikes=1, passed=PROBATION_WINDOWS)}  # served its first probation
    assert not book["bad"].active
    ch = after_check(book, serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False, now_s=0)
    assert ch.book["bad"].strikes == 2 and ch.book["bad"].passed == 0 and ch.book["bad"].required == 8
    assert "bad" in ch.entered
    with pytest.raises(ValueError):
        NodeProbation(strikes=0)


def test_probation_never_quarantines_it_only_checks_every_window():
    """An attacker cannot frame an honest node through probation: it only draws every window of the
    chains holding it checked (cost); quarantine comes from a check's own blame."""
    clock = FakeClock()
    book = Probations(clock=clock)
    for _ in range(10):  # retired again and again without a culprit
        book.after_check(model="m", serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=True)
    assert set(book.active()) == {"a", "bad"} and book.active()["a"].strikes == 10
    quarantined = []
    app = SimpleNamespace(registry=SimpleNamespace(quarantine=lambda nid, why: quarantined.append(nid)))
    checks = Checks(SimpleNamespace(app=app), book)
    watched = SimpleNamespace(node_ids=["c", "a"])
    assert checks.watched(watched) and not checks.watched(SimpleNamespace(node_ids=["c", "d"]))
    assert quarantined == []


def test_the_book_survives_a_restart_of_the_coordinator(tmp_path):
    db = SimpleNamespace(connect=lambda: sqlite3.connect(tmp_path / "s.db", check_same_thread=False))
    store = ModelStore(db, tmp_path)
    book = Probations(clock=FakeClock(100.0), store=store)
    book.after_check(model="m", serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False)
    caught = Outcome(release=False, retire=(0,), disputed=True, quarantine=(("bad", "wrong output"),))
    book.after_check(model="m", serving=SERVING, checker=CHECKER, outcome=caught, window_done=False)
    store.close()
    again = Probations(store=ModelStore(db, tmp_path))
    assert set(again.active()) == {"a"} and again.active()["a"].since_s == 100.0


def test_a_later_stage_retired_unblamed_is_watched_then_quarantined_at_its_next_fault():
    """Checks._judge end to end, without processes: a wrong later stage on a chain whose session had
    unchecked steps retires the chain (no blame) and puts its nodes on probation; the healer loads the
    same nodes again (a new chain), whose every window is drawn checked (fresh), and the next wrong
    output quarantines the faulty node, not its neighbour."""
    import threading
    from pathlib import Path

    from coordinator.inference.replica import Replica
    from coordinator.inference.sessions import StageRef
    from swarm.inference.verify import Reference

    right, logits, wrong = (1.0,) * 32, (2.0,) * 32, (-5.0,) * 32
    quarantined = []
    e = SimpleNamespace(_lock=threading.Lock(), suspect=lambda nid: None, app=SimpleNamespace(
        registry=SimpleNamespace(quarantine=lambda nid, why: quarantined.append(nid) or True)))
    checks = Checks(e, Probations(clock=FakeClock()))
    checks.referee = SimpleNamespace(reference=lambda *a, **k: Reference(outputs={1: right, 2: logits},
                                                                         tokens=frozenset({1})))

    def result(replica, *, fresh, bad_output):
        return ChainResult(replica=replica, token=1, fresh=fresh, stages=(
            StageCommit(node_id="a", first_layer=0, last_layer_excl=1, output=right),
            StageCommit(node_id="bad", first_layer=1, last_layer_excl=2, input=right, output=bad_output)))

    checker = ChainResult(replica=9, token=1, stages=(
        StageCommit(node_id="c", first_layer=0, last_layer_excl=1, output=right),
        StageCommit(node_id="d", first_layer=1, last_layer_excl=2, input=right, output=logits)))

    def judge(serving, res):
        m = SimpleNamespace(replicas=[serving, SimpleNamespace(index=9, state="ready", stages=[])], num_checks=0,
                            num_check_failures=0, record=SimpleNamespace(name="m", dir=Path("."), digest="x"),
                            config=SimpleNamespace(num_layers=2))
        s = SimpleNamespace(replica=serving, handed_off_from=None, state=SimpleNamespace(params=None))
        return checks._judge(m, serving, s, object(), (1, 2), 1, res, checker, window_done=True)

    def chain(index):
        r = Replica(model="m", index=index, stages=[], max_sessions=4, on_failure=lambda *a: None,
                    on_finish=lambda *a: None, checks=checks, verify_prob=0.0001)
        r.stages = [StageRef(node_id=n, address="127.0.0.1:9", first_layer=k, last_layer_excl=k + 1)
                    for k, n in enumerate(("a", "bad"))]  # (no channels: nothing is sent)
        r.state = "ready"
        r._rng = SimpleNamespace(random=lambda: 0.5)  # an unchecked window, unless watched
        return r

    first = chain(0)
    assert not first._draw()
    retire = judge(first, result(0, fresh=False, bad_output=wrong))
    assert [r for r, _ in retire] == [first] and quarantined == []  # retired, nobody blamed
    assert set(checks.probation.active()) == {"a", "bad"}
    again = chain(1)  # the healer loads the same nodes
    assert again._draw() and checks.watched(again)  # every window of its sessions is checked: fresh
    retire = judge(again, result(1, fresh=True, bad_output=wrong))
    assert quarantined == ["bad"] and [r for r, _ in retire] == [again]
    assert set(checks.probation.active()) == {"a"}  # the honest neighbour is only watched


def test_replays_prefer_chains_without_nodes_on_probation():
    class Other:
        def __init__(self, index, nodes, num_sessions):
            self.index, self.node_ids, self.num_sessions, self.state, self.tasks = index, nodes, num_sessions, "ready", []

        def add_check(self, task):
            self.tasks.append(task)
            return True

    book = Probations(clock=FakeClock())
    book.after_check(model="m", serving=SERVING, checker=CHECKER, outcome=RETIRED, window_done=False)
    serving = SimpleNamespace(index=0, node_ids=["x"], state="ready")
    watched, clean = Other(1, ["bad"], 0), Other(2, ["y"], 3)  # the watched one is idler
    m = SimpleNamespace(replicas=[serving, watched, clean])
    checks = Checks(SimpleNamespace(get=lambda name: m, disagg=SimpleNamespace(prefill_indices=lambda m: set())), book)
    s = SimpleNamespace(model="m", check_batch=[[serving, object(), (1, 2, 3), 4, None, None]],
                        state=SimpleNamespace(params=None))
    checks.begin(serving, s)
    assert len(clean.tasks) == 1 and watched.tasks == []
    assert s.check_batch == [] and clean.tasks[0].points == (2,)
