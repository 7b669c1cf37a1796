"""Measured memory bandwidth (swarm/hardware.py): the probe, validation of what a node reports,
old nodes that do not report it, persistence, what status shows, and how much placement believes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from coordinator.registry import NodeRegistry
from coordinator.store import Database
from swarm.clock import FakeClock
from swarm.errors import InvalidRequestError
from swarm.hardware import (MAX_MEM_BANDWIDTH_BPS, HardwareInfo, check_mem_bandwidth, measure_mem_bandwidth_Bps,
                            reported_mem_bandwidth)
from swarm.membership import effective_mem_bandwidth, node_json
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.transport.convert import hardware_from_proto, hardware_to_proto

HW = HardwareInfo(device="cuda:0", device_kind="cuda", device_name="gpu", memory_bytes=80 << 30,
                  memory_free_bytes=70 << 30, compute_capability="9.0", cpu_cores=16, ram_bytes=128 << 30,
                  disk_free_bytes=1 << 40, tflops=700.0, tflops_dtype="bfloat16", mem_bandwidth_Bps=3.3e12)


def test_the_probe_measures_a_plausible_figure_quickly():
    bw = measure_mem_bandwidth_Bps("cpu", duration_s=0.05, nbytes=8 << 20)
    assert 1e8 <= bw <= MAX_MEM_BANDWIDTH_BPS
    check_mem_bandwidth(bw)


def test_it_travels_in_registration_and_back():
    msg = hardware_to_proto(HW)
    assert msg.mem_bandwidth_Bps == 3.3e12
    assert hardware_from_proto(pb.Hardware.FromString(msg.SerializeToString())) == HW


def test_an_older_node_without_the_field_registers_as_unmeasured():
    msg = hardware_to_proto(HW)
    msg.ClearField("mem_bandwidth_Bps")
    hw = hardware_from_proto(pb.Hardware.FromString(msg.SerializeToString()))
    assert hw.mem_bandwidth_Bps == 0.0
    assert node_json(_node(hw), 0.0)["mem_bandwidth_Bps"] is None


@pytest.mark.parametrize("value, words", [
    (math.nan, "finite"), (math.inf, "finite"), (-1.0, "plausible"), (1e15, "restart swarm-node join"),
    (1.5e16, "plausible"),
])
def test_implausible_figures_are_refused_with_what_to_do(value, words):
    msg = hardware_to_proto(HW)
    msg.mem_bandwidth_Bps = value
    with pytest.raises(InvalidRequestError, match=words) as err:
        hardware_from_proto(msg)
    assert "mem_bandwidth_Bps" in str(err.value)


@pytest.mark.parametrize("value", [1.0, 5e7, 9.99e7])
def test_a_starved_probe_under_the_floor_registers_as_unmeasured(value):
    """A node so loaded that its timed copies crawl is honest and slow: it registers (unmeasured),
    it is not refused at join (an older node may send such a figure; a new one sends 0)."""
    msg = hardware_to_proto(HW)
    msg.mem_bandwidth_Bps = value
    hw = hardware_from_proto(pb.Hardware.FromString(msg.SerializeToString()))
    assert hw.mem_bandwidth_Bps == 0.0
    assert node_json(_node(hw), 0.0)["mem_bandwidth_Bps"] is None
    assert reported_mem_bandwidth(value) == 0.0
    assert reported_mem_bandwidth(1e8) == 1e8  # the floor itself is a measurement


def test_a_node_claiming_little_compute_still_registers():
    """SWARM_FAULT claim-tflops=0.0001 (tests/multiproc/training/test_train_slow_node.py): a ratio
    of two claims proves nothing, so only the range is refused at registration."""
    check_mem_bandwidth(5e9)
    HardwareInfo(**{**dataclasses.asdict(HW), "tflops": 0.0001, "mem_bandwidth_Bps": 5e9})


def test_it_survives_a_coordinator_restart_and_shows_in_status(tmp_path):
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    reg.register(node_id="a" * 32, name="n0", public_key=b"k" * 32, peer_address="127.0.0.1:1", hardware=HW)
    reg.close()
    node = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0).get("a" * 32)
    assert node.hardware.mem_bandwidth_Bps == 3.3e12
    assert json.loads(json.dumps(node_json(node, 0.0)))["mem_bandwidth_Bps"] == 3.3e12
    assert node.planning_mem_bandwidth_Bps == 3.3e12  # nothing measured against its claims yet


def test_rows_stored_before_the_field_load_as_unmeasured(tmp_path):
    db = Database(tmp_path)
    reg = NodeRegistry(db, FakeClock(), node_timeout_s=6.0)
    reg.register(node_id="a" * 32, name="n0", public_key=b"k" * 32, peer_address="127.0.0.1:1", hardware=HW)
    reg.close()
    old = {k: v for k, v in dataclasses.asdict(HW).items() if k != "mem_bandwidth_Bps"}
    conn = db.connect()
    with conn:
        conn.execute("UPDATE nodes SET hardware_json=?", (json.dumps(old),))
    assert NodeRegistry(db, FakeClock(), node_timeout_s=6.0).get("a" * 32).hardware.mem_bandwidth_Bps == 0.0


def test_placement_believes_bandwidth_no_more_than_the_compute_claim():
    assert effective_mem_bandwidth(0.0, claimed_tflops=1.0, planning_tflops=1.0) is None
    assert effective_mem_bandwidth(2e12, claimed_tflops=100.0, planning_tflops=100.0) == 2e12
    # the join challenge found a tenth of the claimed compute: the bandwidth claim is cut alike
    assert effective_mem_bandwidth(2e12, claimed_tflops=100.0, planning_tflops=10.0) == pytest.approx(2e11)
    # more than 20 bytes per measured FLOP/s is no device's: believed up to that
    assert effective_mem_bandwidth(1e12, claimed_tflops=0.01, planning_tflops=0.01) == pytest.approx(2e11)


def _node(hw):
    from swarm.membership import NodeInfo

    return NodeInfo(id="a" * 32, name="n0", state="online", hardware=hw, peer_address="127.0.0.1:1",
                    registered_at_s=0.0, last_seen_at_s=0.0)
