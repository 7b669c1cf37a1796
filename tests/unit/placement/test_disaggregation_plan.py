"""The pure disaggregation decision (swarm/scheduling/disaggregation.py): which nodes prefill,
which decode, which decode node takes each stage's KV, and the predicted gain."""

from __future__ import annotations

import pytest

from swarm.errors import InvalidRequestError
from swarm.scheduling.disaggregation import AUTO_MIN_GAIN, Workload, pair_stages, plan_disaggregation
from swarm.scheduling.placement import Links, ModelShape, PlacementDevice

SHAPE = ModelShape(num_layers=8, hidden_size=1024, layer_bytes=50_000_000, embed_bytes=100_000_000,
                   head_bytes=100_000_000, kv_bytes_per_token_per_layer=8192, flops_per_token_per_layer=1e8,
                   activation_bytes_per_token=4096)


def links(n: int, bw: dict[tuple[int, int], float] | None = None, default: float = 1e9) -> Links:
    bw = bw or {}
    b = tuple(tuple(float("inf") if i == j else bw.get((min(i, j), max(i, j)), default) for j in range(n))
              for i in range(n))
    d = tuple(tuple(0.0 if i == j else 1e-4 for j in range(n)) for i in range(n))
    return Links(delay_s=d, bandwidth_Bps=b)


def devs(tflops: list[float]) -> list[PlacementDevice]:
    return [PlacementDevice(node_id=f"n{i}", tflops=t, memory_bytes=1 << 34) for i, t in enumerate(tflops)]


def test_prefill_goes_to_the_compute_richest_nodes():
    d = devs([1.0, 8.0, 1.0, 8.0])
    plan = plan_disaggregation(d, links(4), SHAPE, num_stages=2, mode="on")
    assert set(plan.prefill_nodes) == {"n1", "n3"} and set(plan.decode_nodes) == {"n0", "n2"}
    assert plan.enabled


def test_alike_nodes_predict_no_throughput_gain_and_say_so():
    plan = plan_disaggregation(devs([2.0] * 4), links(4), SHAPE, num_stages=2)
    assert plan.predicted_gain < 1.0
    assert not plan.enabled  # automatic: needs a predicted gain
    assert "no throughput gain" in plan.reason and "alike" in plan.reason and "--disaggregate" in plan.reason
    assert plan.predicted_tbt_p99_ratio < 1.0  # decode steps no longer carry prefills
    forced = plan_disaggregation(devs([2.0] * 4), links(4), SHAPE, num_stages=2, mode="on")
    assert forced.enabled and "because --disaggregate on asked" in forced.reason


def test_compute_rich_prefill_with_memory_bound_decode_predicts_a_gain_and_enables_itself():
    # HexGen-2's case: two compute-rich nodes with little memory bandwidth, two with 4x less
    # compute but 50x the bandwidth (a decode step reads every weight once)
    d = devs([8.0, 8.0, 2.0, 2.0])
    mem = {"n0": 2e10, "n1": 2e10, "n2": 1e12, "n3": 1e12}
    plan = plan_disaggregation(d, links(4), SHAPE, num_stages=2, mem_bandwidth_Bps=mem,
                               workload=Workload(prompt_tokens=1024, response_tokens=32, batch_sessions=8))
    assert plan.predicted_gain >= AUTO_MIN_GAIN, plan.reason
    assert plan.enabled and not plan.reason.startswith("predicted no")
    assert set(plan.prefill_nodes) == {"n0", "n1"}


def test_kv_link_delay_costs_latency_not_throughput_while_the_batch_moves_at_once():
    # 1-stage chains, the HexGen-2 case above; KV links of a fast bandwidth but a long delay.
    # Prefill makes ~10 sessions/s here. The moves overlap (up to B in flight), so a delay of
    # 300 ms (one move at a time: 3 sessions/s) must not cap the prediction; it did when each move
    # was costed as if it waited for the one before (on loopback links of a loaded machine that
    # made `auto` flip). A delay that B moves in flight cannot cover does, and so does too little
    # bandwidth.
    d = devs([8.0, 2.0])
    mem = {"n0": 2e10, "n1": 1e12}
    w = Workload(prompt_tokens=1024, response_tokens=32, batch_sessions=8)

    def gain(delay: float, bw: float) -> float:
        lk = Links(delay_s=((0.0, delay), (delay, 0.0)), bandwidth_Bps=((float("inf"), bw), (bw, float("inf"))))
        return plan_disaggregation(d, lk, SHAPE, num_stages=1, mem_bandwidth_Bps=mem, workload=w).predicted_gain

    near = gain(1e-4, 1e10)
    assert near >= AUTO_MIN_GAIN
    assert gain(0.3, 1e10) == pytest.approx(near)  # 8 moves in flight: 26 sessions/s
    assert gain(5.0, 1e10) < near / 2  # 8 in flight over 5 s: 1.6 sessions/s
    assert gain(1e-4, 1e8) < near / 2  # 67 MB per session at 100 MB/s: 1.5 sessions/s


def test_kv_moves_on_the_fastest_links():
    # prefill n0 (stage 0), n1 (stage 1); n2 <-> n1 and n3 <-> n0 are the fast pairs
    d = devs([4.0, 4.0, 1.0, 1.0])
    plan = plan_disaggregation(d, links(4, {(0, 3): 1e10, (1, 2): 1e10}, default=1e7), SHAPE, num_stages=2,
                               mode="on")
    pre, dec = plan.prefill_chains[0], plan.decode_chains[0]
    pairs = dict(zip(pre, dec))
    assert pairs == {"n0": "n3", "n1": "n2"}


def test_pair_stages_maximises_the_slowest_link_then_ties_by_id():
    bw = {("a", "x"): 10.0, ("a", "y"): 1.0, ("b", "x"): 5.0, ("b", "y"): 5.0}
    assert pair_stages(["a", "b"], ["x", "y"], lambda p, q: bw[(p, q)]) == ("x", "y")
    assert pair_stages(["a", "b"], ["y", "x"], lambda p, q: 1.0) == ("x", "y")  # all equal: lower ids first
    assert pair_stages(["a"], ["y", "x"], lambda p, q: bw[(p, q)]) == ("x",)


def test_pair_stages_greedy_beyond_the_exact_size():
    pre = [f"p{i}" for i in range(8)]
    dec = [f"d{i}" for i in range(8)]
    out = pair_stages(pre, dec, lambda a, b: 10.0 if a[1:] == b[1:] else 1.0)
    assert out == tuple(dec)


def test_too_few_nodes_are_refused_when_asked_and_reported_otherwise():
    with pytest.raises(InvalidRequestError, match="start more nodes or lower --stages"):
        plan_disaggregation(devs([1.0] * 3), links(3), SHAPE, num_stages=2, mode="on")
    plan = plan_disaggregation(devs([1.0] * 3), links(3), SHAPE, num_stages=2)
    assert not plan.enabled and "fewer than 2 chains" in plan.reason


def test_more_chains_pick_the_best_number_of_prefill_chains_deterministically():
    d = devs([4.0, 4.0, 2.0, 2.0, 1.0, 1.0])
    a = plan_disaggregation(d, links(6), SHAPE, num_stages=2, mode="on")
    b = plan_disaggregation(list(reversed(d)), links(6), SHAPE, num_stages=2, mode="on")
    assert a.prefill_chains == b.prefill_chains and len(a.prefill_chains) + len(a.decode_chains) == 3
    assert set(a.prefill_nodes).isdisjoint(a.decode_nodes)
