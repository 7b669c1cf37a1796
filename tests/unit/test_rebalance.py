"""Re-balancing a job around a node seen slow (coordinator/jobs/rebalance.py): pure, fake clock;
and the planner with seen speeds (coordinator/jobs/planning.py)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.jobs import rebalance
from coordinator.jobs.planning import plan_job, predicted_times
from coordinator.jobs.rebalance import (COOLDOWN_S, MIN_GAIN, SLOWER_STILL, Candidate, Past, calibrated, decide,
                                        history)
from swarm.compression import CodecSpec
from swarm.hardware import HardwareInfo
from swarm.job_spec import JobSpec
from swarm.membership import NodeInfo
from swarm.model.config import ModelConfig

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def time(self) -> float:
        return self.t


def cand(clock, *, node="slow", current=10.0, new=6.0, seen=1.0, steps_left=100, age=60.0):
    return Candidate(node_id=node, seen_ratio=0.2, seen_tflops=seen, current_step_s=current, new_step_s=new,
                     steps_left=steps_left, attempt_age_s=age, now_s=clock.time())


def test_a_big_enough_predicted_gain_re_balances_and_a_small_one_does_not():
    c = FakeClock()
    d = decide(cand(c, current=10.0, new=6.0), [])
    assert d.go and d.gain == pytest.approx(0.4)
    d = decide(cand(c, current=10.0, new=10.0 * (1 - MIN_GAIN) + 0.01), [])
    assert not d.go and "below" in d.why
    assert not decide(cand(c, current=10.0, new=12.0), []).go  # a worse plan


def test_no_re_balance_near_the_end_nor_before_the_attempt_settled():
    c = FakeClock()
    assert not decide(cand(c, steps_left=rebalance.MIN_STEPS_LEFT - 1), []).go
    assert not decide(cand(c, age=rebalance.SETTLE_S - 0.1), []).go


def test_cooldown_at_most_one_re_balance_per_job_per_cooldown():
    c = FakeClock()
    past = [Past(node_id="other", at_s=c.time(), seen_tflops=5.0)]
    c.t += COOLDOWN_S - 1
    d = decide(cand(c), past)
    assert not d.go and "re-balanced" in d.why
    c.t += 1
    assert decide(cand(c), past).go  # another node, after the cooldown


def test_never_twice_for_the_same_node_unless_it_got_slower_still():
    c = FakeClock()
    past = [Past(node_id="slow", at_s=c.time(), seen_tflops=1.0)]
    c.t += 10 * COOLDOWN_S  # long after: the cooldown is not what stops it
    assert not decide(cand(c, seen=1.0), past).go
    assert not decide(cand(c, seen=SLOWER_STILL * 1.0), past).go
    assert decide(cand(c, seen=SLOWER_STILL * 0.99), past).go


def test_history_reads_the_jobs_rebalance_events_and_skips_bad_rows():
    events = [{"kind": "slow_node", "at": 1.0, "fields": {"node_id": "a"}},
              {"kind": "rebalance", "at": 2.0, "fields": {"node": "a", "seen_tflops": 0.5}},
              {"kind": "rebalance", "at": 3.0, "fields": {"node": "b"}},  # no speed: ignored
              {"kind": "rebalance", "at": 4.0, "fields": {"node": 7, "seen_tflops": 1}}]
    assert history(events) == [Past(node_id="a", at_s=2.0, seen_tflops=0.5)]


def test_candidate_refuses_figures_that_are_not_finite():
    with pytest.raises(ValueError):
        Candidate(node_id="a", seen_ratio=float("nan"), seen_tflops=1, current_step_s=1, new_step_s=1, steps_left=1,
                  attempt_age_s=1, now_s=1)
    with pytest.raises(ValueError):
        Candidate(node_id="a", seen_ratio=0.1, seen_tflops=1, current_step_s=0, new_step_s=1, steps_left=1,
                  attempt_age_s=1, now_s=1)


def _nodes(n: int) -> list[NodeInfo]:
    hw = HardwareInfo(device="cpu", device_kind="cpu", device_name="cpu", memory_bytes=8 << 30,
                      memory_free_bytes=8 << 30, cpu_cores=2, ram_bytes=8 << 30, disk_free_bytes=1 << 30,
                      tflops=10.0, tflops_dtype="float32")
    return [NodeInfo(id=f"n{i}", name=f"n{i}", state="online", hardware=hw, peer_address=f"127.0.0.1:{1000 + i}",
                     registered_at_s=0, last_seen_at_s=0) for i in range(n)]


def test_the_planner_with_seen_speeds_gives_the_slow_node_fewer_layers_and_predicts_the_gain():
    config = ModelConfig(family="gpt2", vocab_size=64, hidden_size=64, num_layers=6, num_heads=4,
                         max_position_embeddings=64)
    spec = JobSpec(steps=100, batch_size=8, micro_batch_size=2, seq_len=32, lr=1e-3, codec=CodecSpec.parse("none"),
                   checkpoint_every=0, num_stages=3, num_replicas=1)
    nodes = _nodes(3)
    delay, bw = np.full((3, 3), 1e-4), np.full((3, 3), 1e9)
    before = plan_job(spec=spec, config=config, nodes=nodes, delay_s=delay, bandwidth_Bps=bw)
    assert rebalance.layers_of(before.assignments, "n1") == 2  # even split of 6 over 3 equal nodes
    seen = {"n0": 10.0, "n1": 1.0, "n2": 10.0}
    after = plan_job(spec=spec, config=config, nodes=nodes, delay_s=delay, bandwidth_Bps=bw, tflops=seen)
    assert rebalance.layers_of(after.assignments, "n1") < 2
    kw = dict(spec=spec, config=config, nodes=nodes, delay_s=delay, bandwidth_Bps=bw)
    cur_c, cur_m = predicted_times(before.plan, tflops=seen, **kw)
    new_c, new_m = predicted_times(after.plan, tflops=seen, **kw)
    assert new_c < cur_c / 1.5 and cur_m > 0  # the bottleneck stage holds half the layers
    cur, new = calibrated(measured_step_s=None, current=(cur_c, cur_m), new=(new_c, new_m))
    assert cur == pytest.approx(cur_c + cur_m) and new == pytest.approx(new_c + new_m)
    # the workers measured 0.5 s per step: compute scaled so the current plan predicts that
    cur, new = calibrated(measured_step_s=0.5, current=(cur_c, cur_m), new=(new_c, new_m))
    assert cur == pytest.approx(0.5) and rebalance.predicted_gain(cur, new) > MIN_GAIN
    # with the speeds as planned, re-planning predicts nothing to gain: no re-balance
    again = plan_job(tflops={}, **kw)
    cur, new = calibrated(measured_step_s=0.5, current=predicted_times(before.plan, tflops={}, **kw),
                          new=predicted_times(again.plan, tflops={}, **kw))
    assert rebalance.predicted_gain(cur, new) < MIN_GAIN


def test_calibration_never_scales_on_a_measurement_below_the_predicted_communication():
    assert calibrated(measured_step_s=0.1, current=(1.0, 2.0), new=(0.5, 2.0)) == (3.0, 2.5)
    assert calibrated(measured_step_s=float("nan"), current=(1.0, 2.0), new=(0.5, 2.0)) == (3.0, 2.5)
    assert calibrated(measured_step_s=12.0, current=(1.0, 2.0), new=(0.5, 2.0)) == (12.0, 7.0)
