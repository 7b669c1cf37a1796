"""Gradient rounds with work in between, and background parameter rounds, between two real hivemind averagers in this process
(swarm/pipeline/averaging.py, step 4 of its protocol): the round runs while the replicas keep
working, and applying it moves each replica by (mean - its own snapshot), so two replicas that a
failed round set apart meet again even though they changed their parameters in the meantime."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("hivemind")

from swarm.pipeline.averaging import ReplicaAverager  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_background_parameter_round_brings_drifted_replicas_together() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4096, generator=g)
    params = [[torch.nn.Parameter(base + 0.01 * torch.randn(4096, generator=g))] for _ in range(2)]
    own = [p[0].detach().clone() for p in params]
    a = ReplicaAverager(params=params[0], prefix="bground", num_replicas=2, timeout_s=30)
    b = None
    try:
        b = ReplicaAverager(params=params[1], prefix="bground", num_replicas=2, initial_peers=a.maddrs(), timeout_s=30)
        a.wait_for_peers(1, 30)
        b.wait_for_peers(1, 30)
        for av in (a, b):
            av.set_members(a.maddrs() + b.maddrs())
        # a gradient round in flight while the caller works (a spot check reads the weights)
        grads = [torch.randn(4096, generator=g) for _ in range(2)]
        for p, gr in zip(params, grads):
            p[0].grad = gr.clone()
        for k, av in enumerate((a, b)):
            av.begin_gradient_round(step=4)
        assert all(torch.equal(p[0].grad, gr) for p, gr in zip(params, grads))  # untouched until finished
        finished = [None, None]
        threads = [threading.Thread(target=lambda k=k, av=av: finished.__setitem__(k, av.finish_gradient_round()))
                   for k, av in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert finished == [True, True]
        mean = (grads[0] + grads[1]) / 2
        for p in params:
            assert (p[0].grad - mean).norm() / mean.norm() < 5e-3  # fp16 in transit
        for av in (a, b):
            av.begin_parameter_round(step=4)
        # the next step's work happens meanwhile: both replicas apply the same update
        update = 0.001 * torch.randn(4096, generator=g)
        with torch.no_grad():
            for p in params:
                p[0].add_(update)
        # nothing changes until the round is collected and applied
        assert torch.equal(params[0][0].detach(), own[0] + update)
        collected = [None, None]
        threads = [threading.Thread(target=lambda k=k, av=av: collected.__setitem__(k, av.collect_parameter_round()))
                   for k, av in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert collected == [True, True]
        assert torch.equal(params[0][0].detach(), own[0] + update)  # collecting alone leaves them be
        assert a.apply_parameter_round() and b.apply_parameter_round()
        assert not a.apply_parameter_round()  # applied once
        want = (own[0] + own[1]) / 2 + update
        for p in params:
            # fp16 in transit: ~1e-4 relative, far below the 0.01 spread and SYNC_TOLERANCE (3e-3)
            assert (p[0].detach() - want).norm() / want.norm() < 5e-4
        before = (own[0] - own[1]).norm() / own[1].norm()
        after = (params[0][0].detach() - params[1][0].detach()).norm() / params[1][0].detach().norm()
        assert before > 5e-3 and after < 5e-4
    finally:
        for av in (a, b):
            if av is not None:
                av.shutdown()


def test_survivors_of_a_lost_replica_merge_their_parameters_as_a_subgroup() -> None:
    """A fence that lost a replica (node/training/worker.py ``_merge_survivors``): the two live
    replicas of a 3-replica stage average their parameters among themselves (positions 0 and 2 of
    the group), with the third one's averager gone; positions that leave this replica out, or
    fewer than two, are refused before any round starts."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2048, generator=g)
    params = [[torch.nn.Parameter(base + 0.01 * torch.randn(2048, generator=g))] for _ in range(3)]
    own = [p[0].detach().clone() for p in params]
    avs: list[ReplicaAverager] = []
    try:
        avs.append(ReplicaAverager(params=params[0], prefix="merge", num_replicas=3, timeout_s=30))
        for k in (1, 2):
            avs.append(ReplicaAverager(params=params[k], prefix="merge", num_replicas=3,
                                       initial_peers=avs[0].maddrs(), timeout_s=30))
        for av in avs:
            av.wait_for_peers(2, 30)
        maddrs = [m for av in avs for m in av.maddrs()]
        for av in avs:
            av.set_members(maddrs)
        avs[1].shutdown()  # replica 1 is lost (its process gone)
        with pytest.raises(ValueError, match="including this one"):
            avs[0].average_parameters(step=7, members=[1, 2])
        with pytest.raises(ValueError, match="outside the group"):
            avs[0].average_parameters(step=7, members=[0, 3])
        merged = [None, None]
        threads = [threading.Thread(target=lambda k=k: merged.__setitem__(k // 2, avs[k].average_parameters(
            step=7, members=[0, 2]))) for k in (0, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert merged == [True, True]
        want = (own[0] + own[2]) / 2
        for k in (0, 2):
            assert (params[k][0].detach() - want).norm() / want.norm() < 5e-4  # fp16 in transit
        assert torch.equal(params[1][0].detach(), own[1])  # the lost one's values took no part
    finally:
        for av in avs:
            av.shutdown()
