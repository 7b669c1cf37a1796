"""Memory-bandwidth claims checked against observed decode steps (coordinator/inference/memwatch.py):
the bytes a decode step reads, the lower bound its time gives, the rule that replaces a claim far
above it, the trust store keeping the highest, and a chain's decode step reaching the planner's
figure and `swarm status --json`. No network: a Replica's step reply is handed in."""

from __future__ import annotations

import json
import math
import random

import pytest

from coordinator.inference.memwatch import MemBandwidthWatch
from coordinator.inference.replica import Replica
from coordinator.inference.sessions import StageRef
from coordinator.registry import NodeRegistry
from coordinator.store import Database
from swarm.clock import FakeClock
from swarm.hardware import HardwareInfo
from swarm.inference.stage_runtime import StepEntry
from swarm.membership import MEM_BANDWIDTH_SEEN_SLACK, NodeInfo, effective_mem_bandwidth, node_json
from swarm.proto.v1 import inference_pb2 as ipb
from swarm.scheduling.disaggregation import decode_step_bytes, seen_stage_bandwidths
from swarm.scheduling.placement import ModelShape
from swarm.transport.convert import node_from_proto, node_to_proto

pytestmark = pytest.mark.timeout(30)

SHAPE = ModelShape(num_layers=4, hidden_size=64, layer_bytes=1_000_000, embed_bytes=500_000, head_bytes=300_000,
                   kv_bytes_per_token_per_layer=512, flops_per_token_per_layer=5e5, activation_bytes_per_token=64)
HW = HardwareInfo(device="cpu", device_kind="cpu", device_name="cpu", memory_bytes=8 << 30, memory_free_bytes=4 << 30,
                  cpu_cores=2, ram_bytes=8 << 30, disk_free_bytes=1 << 40, tflops=0.5, tflops_dtype="float32",
                  mem_bandwidth_Bps=4e10)
A, B = "a" * 32, "b" * 32


def test_a_decode_step_reads_the_weights_once_and_each_sessions_kv():
    # 2 layers, sessions at 10 and 30 positions: 2 x 1e6 weights + 2 x 512 x 40 KV
    assert decode_step_bytes(SHAPE, num_layers=2, context_tokens=[10, 30]) == 2_000_000 + 2 * 512 * 40
    # the last stage also reads the LM head
    assert decode_step_bytes(SHAPE, num_layers=2, context_tokens=[10], last_stage=True) == 2_000_000 + 300_000 + 10240


def test_each_stage_shows_its_bytes_over_its_time_and_nonsense_shows_nothing():
    seen = seen_stage_bandwidths(SHAPE, stages=[(0, 2), (2, 4)], context_tokens=[1], compute_s=[1e-3, 2e-3])
    assert seen[0] == pytest.approx((2_000_000 + 1024) / 1e-3)
    assert seen[1] == pytest.approx((2_300_000 + 1024) / 2e-3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        assert seen_stage_bandwidths(SHAPE, stages=[(0, 4)], context_tokens=[1], compute_s=[bad]) == [None]


def test_the_seen_figure_is_a_lower_bound_of_any_memory_bound_step():
    """Seeded: whatever the true bandwidth and the overhead on top of the memory time, the seen
    figure never exceeds the truth, so an honest claim is cut only past the slack."""
    rng = random.Random(13)
    for _ in range(200):
        true_bw = 10 ** rng.uniform(8, 13)
        ctx = [rng.randint(1, 500) for _ in range(rng.randint(1, 8))]
        nbytes = decode_step_bytes(SHAPE, num_layers=2, context_tokens=ctx)
        t = nbytes / true_bw * (1 + rng.uniform(0, 3))  # memory time plus up to 3x overhead
        (seen,) = seen_stage_bandwidths(SHAPE, stages=[(0, 2)], context_tokens=ctx, compute_s=[t])
        assert seen <= true_bw * (1 + 1e-9)
        assert effective_mem_bandwidth(true_bw, claimed_tflops=100.0, planning_tflops=100.0, seen_Bps=seen) == true_bw


def test_a_claim_far_above_what_the_steps_show_is_replaced_by_it():
    kw = dict(claimed_tflops=100.0, planning_tflops=100.0)
    assert effective_mem_bandwidth(2e12, **kw, seen_Bps=None) == 2e12
    assert effective_mem_bandwidth(2e12, **kw, seen_Bps=2e12 / MEM_BANDWIDTH_SEEN_SLACK) == 2e12  # at the slack: stands
    assert effective_mem_bandwidth(2e12, **kw, seen_Bps=1e11) == 1e11  # 20x: the steps' figure
    # the TFLOPS cut comes first: a claim already cut to 2e11 is within 4x of 1e11
    assert effective_mem_bandwidth(2e12, claimed_tflops=100.0, planning_tflops=10.0, seen_Bps=1e11) == pytest.approx(2e11)
    assert effective_mem_bandwidth(0.0, **kw, seen_Bps=1e11) is None  # unmeasured stays the model's default


def test_the_store_keeps_the_highest_seen_and_survives_a_restart(tmp_path):
    reg = NodeRegistry(Database(tmp_path), FakeClock(), node_timeout_s=6.0)
    for bw in (1e9, 3e9, 2e9, math.nan, -1.0, 0.0):  # a slower (or forged slow) step lowers nothing
        reg.trust.observe_mem_bandwidth(A, bw)
    assert reg.trust.seen_mem_bandwidth(A) == 3e9
    assert reg.trust.seen_mem_bandwidth(B) is None
    reg.close()
    assert NodeRegistry(Database(tmp_path), FakeClock(), node_timeout_s=6.0).trust.seen_mem_bandwidth(A) == 3e9


def _replica(observer):
    stages = [StageRef(node_id=A, address="127.0.0.1:1", first_layer=0, last_layer_excl=2),
              StageRef(node_id=B, address="127.0.0.1:2", first_layer=2, last_layer_excl=4)]
    r = Replica(model="m", index=0, stages=[], max_sessions=4, on_failure=lambda *a: None,
                on_finish=lambda *a: None, on_decode_step=observer)  # no stages: no channels to open
    r.stages = stages
    return r


def test_a_chains_decode_steps_reach_the_planner_and_status(tmp_path):
    reg = NodeRegistry(Database(tmp_path), FakeClock(), node_timeout_s=6.0)
    for i, nid in enumerate((A, B)):
        reg.register(node_id=nid, name=f"n{i}", public_key=bytes([i]) * 32, peer_address=f"127.0.0.1:{i + 1}",
                     hardware=HW)
    r = _replica(MemBandwidthWatch(lambda: reg.trust).observer(SHAPE))
    decode = [StepEntry(session_id="s1", start_position=9, num_tokens=1),
              StepEntry(session_id="s2", start_position=29, num_tokens=1)]
    # stage A (first) took 10 ms, stage B 0.2 ms: the reply lists the last stage first
    r._observed(decode, ipb.ServeStepReply(token_ids=[1, 2], stage_compute_s=[2e-4, 1e-2]), 0.02)
    a_seen = (2_000_000 + 2 * 512 * 40) / 1e-2  # ~2e8 B/s
    b_seen = (2_300_000 + 2 * 512 * 40) / 2e-4  # ~1.2e10 B/s
    assert reg.trust.seen_mem_bandwidth(A) == pytest.approx(a_seen)
    assert reg.trust.seen_mem_bandwidth(B) == pytest.approx(b_seen)
    a, b = reg.get(A), reg.get(B)
    assert a.planning_mem_bandwidth_Bps == pytest.approx(a_seen)  # 4e10 claimed, 200x what it showed
    assert b.planning_mem_bandwidth_Bps == 4e10  # within 4x of what it showed: the claim stands
    # a prefill step (compute-bound) says nothing of memory: not counted
    r._observed([StepEntry(session_id="s3", start_position=0, num_tokens=40, token_ids=tuple(range(40)))],
                ipb.ServeStepReply(token_ids=[3], stage_compute_s=[1e-6, 1e-6]), 0.01)
    assert reg.trust.seen_mem_bandwidth(A) == pytest.approx(a_seen)
    # a reply with a stage time missing or nonsense is data, not an error
    r._observed(decode, ipb.ServeStepReply(token_ids=[1, 2], stage_compute_s=[1e-3]), 0.02)
    r._observed(decode, ipb.ServeStepReply(token_ids=[1, 2], stage_compute_s=[math.nan, -1.0]), 0.02)
    assert reg.trust.seen_mem_bandwidth(A) == pytest.approx(a_seen)
    # `swarm status --json` (through ListNodes' NodeRecord) shows both figures
    shown = json.loads(json.dumps(node_json(node_from_proto(node_to_proto(a)), 0.0)))
    assert shown["mem_bandwidth_Bps"] == 4e10
    assert shown["mem_bandwidth_seen_Bps"] == pytest.approx(a_seen)
    assert shown["mem_bandwidth_planning_Bps"] == pytest.approx(a_seen)


def test_a_node_never_seen_decoding_shows_null_and_bad_wire_values_are_dropped():
    node = NodeInfo(id=A, name="n0", state="online", hardware=HW, peer_address="127.0.0.1:1",
                    registered_at_s=0.0, last_seen_at_s=0.0)
    assert node_json(node, 0.0)["mem_bandwidth_seen_Bps"] is None
    for bad in (math.nan, -5.0, math.inf):
        msg = node_to_proto(node)
        msg.seen_mem_bandwidth_Bps = bad
        assert node_from_proto(msg).seen_mem_bandwidth_Bps is None
