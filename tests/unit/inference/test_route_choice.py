"""Per-request route choice (coordinator/inference/routes.py): pure, no network, no clock."""

from __future__ import annotations

import math
import random

import pytest
import torch

from coordinator.inference.routes import Hop, LiveMap, pick_route
from node.inference.routing import replayed_here, route_hop
from swarm.errors import InvalidRequestError
from swarm.proto.v1 import inference_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def _grid(num_stages: int, num_replicas: int) -> list[list[Hop]]:
    return [[Hop(replica=r, node_id=f"n{r}{k}") for r in range(num_replicas)] for k in range(num_stages)]


def _assign(stages, step_s, *, n: int, capacity: int = 1000, hop_s=lambda a, b: 0.0) -> dict[str, int]:
    """Sessions arriving one after another (none finishing): the queue each one sees."""
    queue: dict[str, int] = {}
    for _ in range(n):
        choice = pick_route(stages, step_s=step_s, queue=queue, capacity=capacity, hop_s=hop_s)
        assert choice is not None
        for h in choice.hops:
            queue[h.node_id] = queue.get(h.node_id, 0) + 1
    return queue


def test_a_slowed_replica_gets_proportionally_fewer_sessions():
    stages = _grid(2, 2)
    step_s = {"n00": 0.02, "n10": 0.01, "n01": 0.01, "n11": 0.01}  # stage 0 of replica 0: twice as slow
    q = _assign(stages, step_s, n=30)
    assert (q["n00"], q["n10"]) == (10, 20)  # 1 : 2, the inverse of the step times
    assert (q["n01"], q["n11"]) == (15, 15)  # the other stage is unaffected


@pytest.mark.parametrize("seed", range(5))
def test_split_follows_speed_for_random_step_times(seed):
    rng = random.Random(seed)
    stages = _grid(3, 3)
    step_s = {h.node_id: rng.uniform(0.005, 0.05) for c in stages for h in c}
    n = 300
    q = _assign(stages, step_s, n=n)
    for cands in stages:
        speeds = {h.node_id: 1 / step_s[h.node_id] for h in cands}
        total = sum(speeds.values())
        for nid, v in speeds.items():  # greedy equalisation: within one session of the ideal split
            assert abs(q.get(nid, 0) - n * v / total) <= 1.5, (nid, q, speeds)


def test_capacity_and_none_when_a_stage_is_full():
    stages = _grid(2, 2)
    step_s = {h.node_id: 0.01 for c in stages for h in c}
    step_s["n00"] = 0.001  # fast, but full
    choice = pick_route(stages, step_s=step_s, queue={"n00": 4}, capacity=4, hop_s=lambda a, b: 0.0)
    assert choice.hops[0] == Hop(replica=1, node_id="n10")
    assert pick_route(stages, step_s=step_s, queue={"n00": 4, "n10": 4}, capacity=4, hop_s=lambda a, b: 0.0) is None


def test_hop_delay_counts_and_ties_are_deterministic():
    stages = _grid(2, 2)
    step_s = {h.node_id: 0.01 for c in stages for h in c}
    same = pick_route(stages, step_s=step_s, queue={}, capacity=8, hop_s=lambda a, b: 0.0)
    assert [h.replica for h in same.hops] == [0, 0]  # tie: the lower replicas
    slow = {("n00", "n01"): 0.5}
    choice = pick_route(stages, step_s=step_s, queue={}, capacity=8, hop_s=lambda a, b: slow.get((a, b), 0.001))
    assert [h.node_id for h in choice.hops] != ["n00", "n01"]
    assert math.isclose(choice.predicted_s, 0.01 + 0.01 + 0.001)


def test_fixed_stages_are_kept_even_when_full():
    stages = _grid(3, 2)
    step_s = {h.node_id: 0.01 for c in stages for h in c}
    step_s["n12"] = 0.5  # replica 1's last stage is slow, but the session's cache is there
    fixed = {0: Hop(replica=1, node_id="n10"), 2: Hop(replica=1, node_id="n12")}
    choice = pick_route(stages, step_s=step_s, queue={"n10": 8, "n12": 8}, capacity=8, hop_s=lambda a, b: 0.0,
                        fixed=fixed)
    assert choice.hops[0] == fixed[0] and choice.hops[2] == fixed[2]
    assert pick_route(stages, step_s=step_s, queue={}, capacity=8, hop_s=lambda a, b: 0.0,
                      fixed={0: Hop(replica=5, node_id="gone")}) is None


def test_live_map_prior_fit_and_validation():
    live = LiveMap(alpha=0.5)
    stages = _grid(1, 3)
    live.observe("n00", 2, 0.04)  # one batch size seen: all of it per session
    live.observe("n10", 1, 0.04)
    live.observe("n10", 1, float("nan"))  # a node's nonsense report is ignored
    live.observe("n10", 0, 1.0)
    per, fixed = live.costs(stages)
    assert per == {"n00": 0.02, "n10": 0.04, "n20": pytest.approx(0.03)}  # unmeasured: the stage's mean
    assert fixed == {"n00": 0.0, "n10": 0.0, "n20": 0.0}
    fit = LiveMap(alpha=0.3)
    for b in (1, 4, 2, 8, 1, 4, 2, 8):
        fit.observe("n", b, 0.005 + 0.001 * b)  # 5 ms per step + 1 ms per session
    (p, f), = fit.snapshot().values()
    assert p == pytest.approx(0.001) and f == pytest.approx(0.005)


def test_a_fixed_step_cost_makes_sessions_join_active_routes():
    stages = _grid(2, 2)
    per = {h.node_id: 0.001 for c in stages for h in c}
    fixed_s = {h.node_id: 0.01 for c in stages for h in c}
    active = [(Hop(replica=0, node_id="n00"), Hop(replica=0, node_id="n01"))]
    kw = dict(step_s=per, fixed_s=fixed_s, capacity=8, hop_s=lambda a, b: 0.0, active=active)
    # route (0, 0) steps with 3 sessions: joining costs 2 x (4 x 1 ms + 10 ms), a new route on idle
    # nodes 2 x (1 ms + 10 ms)
    new = pick_route(stages, queue={"n00": 3, "n01": 3}, drivers={"n00": 1, "n01": 1}, **kw)
    assert [h.replica for h in new.hops] == [1, 1] and new.predicted_s == pytest.approx(0.022)
    # with 1 session: joining costs 2 x (2 ms + 10 ms) = 24 ms, a mixed or new route more
    join = pick_route(stages, queue={"n00": 1, "n01": 1, "n10": 1, "n11": 1},
                      drivers={"n00": 1, "n01": 1, "n10": 1, "n11": 1}, **kw)
    assert [h.replica for h in join.hops] == [0, 0] and join.predicted_s == pytest.approx(0.024)


# ---------------------------------------------------------------- the node's side
def _entry(sid, start, n, reset=False, replay=0):
    return pb.ServeSessionEntry(session_id=sid, start_position=start, num_tokens=n, token_ids=list(range(1, n + 1)),
                                reset=reset, replay_stages=replay)


def test_a_replay_ends_at_its_stage_as_a_one_token_decode():
    entries = [_entry("a", 0, 3, reset=True, replay=2), _entry("b", 7, 1), _entry("c", 0, 2, reset=True)]
    out = torch.arange(6, dtype=torch.float32).unsqueeze(1)  # rows: a a a b c c
    same, rows = replayed_here(entries, out, stage=0)  # a's replay goes on to stage 1
    assert same is entries and rows is out
    fwd, rows = replayed_here(entries, out, stage=1)
    assert [(e.session_id, e.start_position, e.num_tokens, e.reset, list(e.token_ids)) for e in fwd] == [
        ("a", 2, 1, False, [3]), ("b", 7, 1, False, [1]), ("c", 0, 2, True, [1, 2])]
    assert rows.squeeze(1).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_route_hop_validation():
    a = pb.ServeStageAssignment(model_name="m", replica=1, stage=0, num_stages=2)
    hop0 = pb.ServeRouteHop(replica=1, node_id="me", address="x:1")
    hop1 = pb.ServeRouteHop(replica=0, node_id="peer", address="y:2", capability="c")
    assert route_hop(a, pb.ServeStepRequest(), "me") is None
    assert route_hop(a, pb.ServeStepRequest(route=[hop0, hop1]), "me").node_id == "peer"
    with pytest.raises(InvalidRequestError):
        route_hop(a, pb.ServeStepRequest(route=[hop0]), "me")  # one hop per stage
    with pytest.raises(InvalidRequestError):
        route_hop(a, pb.ServeStepRequest(route=[hop0, hop1]), "someone-else")
    with pytest.raises(InvalidRequestError):
        route_hop(a, pb.ServeStepRequest(route=[hop0, pb.ServeRouteHop(replica=0, node_id="", address="y:2")]), "me")


def test_shared_split_makes_chains_interchangeable():
    from coordinator.inference.routes import shared_split

    splits = [[(0, 2), (2, 4)], [(0, 3), (3, 4)], [(0, 4)]]
    assert shared_split(splits) == [[(0, 2), (2, 4)], [(0, 2), (2, 4)], [(0, 4)]]
    assert shared_split([]) == []


def test_slowdown_fault_parses_and_is_bounded():
    from swarm.errors import ConfigError
    from swarm.faults import FaultConfig

    assert FaultConfig.parse("slowdown=3").slowdown == 3.0
    assert FaultConfig.parse("slowdown=3").any and not FaultConfig().any
    for bad in ("slowdown=0.5", "slowdown=nan", "slowdown=101"):
        with pytest.raises(ConfigError):
            FaultConfig.parse(bad)
