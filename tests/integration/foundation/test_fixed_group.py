"""Fixed-group averaging rounds between two real hivemind averagers in this process
(swarm/pipeline/fixed_group.py): no matchmaking, a groupmate that starts late is waited for, rounds
that differ never mix, and a groupmate that is gone fails the round without holding the other up
for longer than its timeout."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("hivemind")

from swarm.pipeline.averaging import ReplicaAverager  # noqa: E402

pytestmark = pytest.mark.timeout(120)

N = 4096


@pytest.fixture(scope="module")
def pair():
    params = [[torch.nn.Parameter(torch.zeros(N))] for _ in range(2)]
    a = ReplicaAverager(params=params[0], prefix="fixed", num_replicas=2, timeout_s=30)
    b = None
    try:
        b = ReplicaAverager(params=params[1], prefix="fixed", num_replicas=2, initial_peers=a.maddrs(), timeout_s=30)
        for av in (a, b):
            av.wait_for_peers(1, 30)
            av.set_members(a.maddrs() + b.maddrs())
        yield a, b, params
    finally:
        for av in (a, b):
            if av is not None:
                av.shutdown()


def _rounds(avs, steps, delays=(0.0, 0.0)):
    """Each replica's gradient round of its step, started after its delay; the outcomes."""
    out = [None] * len(avs)

    def one(k):
        time.sleep(delays[k])  # replicas finish their compute at different times
        out[k] = avs[k].average_gradients(step=steps[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(avs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def _set_grads(params, g):
    grads = [torch.randn(N, generator=g) for _ in params]
    for p, gr in zip(params, grads):
        p[0].grad = gr.clone()
    return grads


def test_set_members_needs_exactly_the_group(pair) -> None:
    a, b, _ = pair
    with pytest.raises(ValueError, match="2 replicas"):
        a.set_members(a.maddrs())  # the other replica missing
    with pytest.raises(ValueError, match="/p2p/"):
        a.set_members(["/ip4/127.0.0.1/tcp/1"])
    with pytest.raises(ValueError, match="this one"):
        a.set_members(b.maddrs() + ["/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
    a.set_members(a.maddrs() + b.maddrs() + a.maddrs())  # duplicates count once, at the first
    assert a.members == b.members == [a.peer_id(), b.peer_id()]  # replica order: the rounds' peer order


def test_rounds_average_even_when_one_replica_starts_late(pair) -> None:
    a, b, params = pair
    g = torch.Generator().manual_seed(1)
    for step, delays in enumerate([(0.0, 0.0), (0.0, 1.5), (1.5, 0.0)]):
        grads = _set_grads(params, g)
        assert _rounds((a, b), (step, step), delays) == [True, True]
        mean = (grads[0] + grads[1]) / 2
        for p in params:
            assert (p[0].grad - mean).norm() / mean.norm() < 5e-3  # fp16 in transit


def test_different_rounds_never_mix(pair) -> None:
    a, b, params = pair
    g = torch.Generator().manual_seed(2)
    grads = _set_grads(params, g)
    for av in (a, b):
        av.timeout_s = 2.0
    try:
        assert _rounds((a, b), (10, 11)) == [False, False]  # steps differ: no common round
    finally:
        for av in (a, b):
            av.timeout_s = 30
    for p, gr in zip(params, grads):
        assert torch.equal(p[0].grad, gr)  # local gradients kept
    assert _rounds((a, b), (12, 12)) == [True, True]  # and the next common round works


def test_every_round_of_two_healthy_replicas_counts(pair) -> None:
    """Back to back, as a job's steps are: no round may fail. Before the member that opens a stream
    closed it (fixed_group.py, step 5), ~1% of rounds lost their last parts on a loaded machine."""
    a, b, params = pair
    g = torch.Generator().manual_seed(4)
    failed = (a.num_failed, b.num_failed)
    for step in range(100, 160):
        grads = _set_grads(params, g)
        assert _rounds((a, b), (step, step)) == [True, True], f"round {step} failed"
    assert (a.num_failed, b.num_failed) == failed
    mean = (grads[0] + grads[1]) / 2
    for p in params:
        assert (p[0].grad - mean).norm() / mean.norm() < 5e-3


def test_the_outcome_depends_on_the_replica_order_alone(pair) -> None:
    """The members' order is the all-reduce's peer order: the same order gives the same gradients
    to the last bit (whatever the peer ids; the rendezvous gives replica order, so every run of a
    job does), another order other fp16 roundings."""
    a, b, params = pair
    grads = _set_grads(params, torch.Generator().manual_seed(5))

    def once(order):
        for av in (a, b):
            av.set_members([m for av2 in order for m in av2.maddrs()])
        for p, gr in zip(params, grads):
            p[0].grad = gr.clone()
        assert _rounds((a, b), (200 + len(outcomes), 200 + len(outcomes))) == [True, True]
        outcomes.append([p[0].grad.clone() for p in params])

    outcomes: list = []
    try:
        once((a, b))
        once((b, a))
        once((a, b))
    finally:
        for av in (a, b):
            av.set_members(a.maddrs() + b.maddrs())
    assert all(torch.equal(x, y) for x, y in zip(outcomes[0], outcomes[2]))
    assert not all(torch.equal(x, y) for x, y in zip(outcomes[0], outcomes[1]))


def test_a_gone_replica_fails_the_round_within_its_timeout(pair) -> None:
    a, b, params = pair
    g = torch.Generator().manual_seed(3)
    b.shutdown()
    grads = _set_grads(params, g)
    before = a.num_failed
    # bounded by the round's timeout; often sooner (hivemind cannot reach b: the round cannot count)
    a.timeout_s = 3.0
    assert a.average_gradients(step=20) is False
    assert a.num_failed == before + 1
    assert torch.equal(params[0][0].grad, grads[0])  # local gradients kept


def test_group_of_is_the_same_on_every_member_and_differs_per_round() -> None:
    from hivemind.utils.serializer import MSGPackSerializer as S

    from swarm.pipeline.fixed_group import group_of

    ids = ["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"]
    data = lambda step, members: S.dumps([None, 0, S.dumps(["grad", step, members])])  # noqa: E731
    gid, order = group_of("p", data(3, ids), ids)
    assert (gid, order) == group_of("p", data(3, ids), ids + ids[:1])  # the same on every member
    assert [str(p) for p in order] == ids  # the members' (replica) order, not sorted
    assert group_of("p", data(3, ids[::-1]), ids[::-1])[0] != gid  # another order is another round
    assert gid != group_of("p", data(4, ids), ids)[0]  # another step
    assert gid != group_of("q", data(3, ids), ids)[0]  # another job/attempt/stage
