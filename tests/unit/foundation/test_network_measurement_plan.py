"""Network store matrices and the measurement scheduler (fake clock, no network)."""

import math

import numpy as np
import pytest

from coordinator.network import MeasurementPolicy, MeasurementScheduler, NetworkStore, candidate_peers
from coordinator.store import Database
from swarm.clock import FakeClock
from swarm.hardware import HardwareInfo
from swarm.membership import Link, NodeInfo

HW = HardwareInfo(device="cpu", device_kind="cpu", device_name="c", memory_bytes=1 << 30, memory_free_bytes=1 << 30,
                  cpu_cores=1, ram_bytes=1 << 30, disk_free_bytes=1 << 30, tflops=0.1, tflops_dtype="float32")


def nodes(n):
    return tuple(NodeInfo(id=f"{i:032x}", name=f"n{i}", state="online", hardware=HW, peer_address=f"127.0.0.1:{1000 + i}",
                          registered_at_s=0.0, last_seen_at_s=0.0) for i in range(n))


def link(src, dst, t, bw=1e6):
    return Link(src=src, dst=dst, delay_s=0.01, rtt_s=0.02, bandwidth_Bps=bw, measured_at_s=t)


def test_matrix_layout_and_persistence(tmp_path):
    db = Database(tmp_path)
    store = NetworkStore(db)
    ns = nodes(3)
    ids = [n.id for n in ns]
    store.record(link(ids[0], ids[1], 5.0, bw=2e6))
    delay, bw, measured = store.matrix(ids)
    assert bw[0, 1] == 2e6 and delay[0, 1] == 0.01 and measured[0, 1] == 5.0
    assert math.isnan(bw[1, 0]) and math.isnan(measured[2, 0])
    assert np.all(np.diag(delay) == 0) and np.all(np.isinf(np.diag(bw)))
    store.close()
    assert NetworkStore(Database(tmp_path)).get(ids[0], ids[1]).bandwidth_Bps == 2e6


def test_scheduler_covers_all_pairs_one_task_per_node(tmp_path):
    clock = FakeClock()
    store = NetworkStore(Database(tmp_path))
    sched = MeasurementScheduler(store, clock, MeasurementPolicy())
    ns = nodes(4)
    measured = set()
    for _ in range(40):
        tasks = [t for n in ns if (t := sched.next_task(n.id, ns)) is not None]
        busy = [x for t in tasks for x in (t.src, t.dst)]
        assert len(busy) == len(set(busy)), "a node takes part in one measurement at a time"
        for t in tasks:
            assert sched.complete(t.task_id, t.src, failed=False) is t
            store.record(link(t.src, t.dst, clock.time()))
            measured.add((t.src, t.dst))
        clock.advance(1)
    assert len(measured) == 12
    # everything fresh: nothing to do until the re-measure interval passes
    assert all(sched.next_task(n.id, ns) is None for n in ns)
    clock.advance(300)
    assert sched.next_task(ns[0].id, ns) is not None


def test_failed_and_timed_out_tasks_retry_later(tmp_path):
    clock = FakeClock()
    policy = MeasurementPolicy(task_timeout_s=30, retry_after_failure_s=10)
    sched = MeasurementScheduler(NetworkStore(Database(tmp_path)), clock, policy)
    ns = nodes(2)
    t = sched.next_task(ns[0].id, ns)
    assert sched.next_task(ns[0].id, ns) is None  # busy
    assert sched.complete(t.task_id, ns[1].id, failed=False) is None  # wrong reporter
    sched.complete(t.task_id, ns[0].id, failed=True)
    assert sched.next_task(ns[0].id, ns) is None  # failed recently
    clock.advance(11)
    t2 = sched.next_task(ns[0].id, ns)
    assert t2 is not None and t2.dst == ns[1].id
    clock.advance(31)  # never reported: expires
    assert sched.next_task(ns[1].id, ns) is not None


def test_large_swarms_are_sampled_deterministically():
    policy = MeasurementPolicy(max_full_mesh_nodes=32, sample_peers=8, seed=3)
    ids = [f"{i:032x}" for i in range(100)]
    a = candidate_peers(ids[0], ids, policy, now_s=1000.0)
    assert len(a) == 8 and ids[0] not in a and len(set(a)) == 8
    assert a == candidate_peers(ids[0], ids, policy, now_s=1001.0)
    assert a != candidate_peers(ids[0], ids, policy, now_s=1000.0 + policy.remeasure_interval_s)
    assert candidate_peers(ids[0], ids[:32], policy, 0.0) == sorted(ids[1:32])


def test_policy_validation():
    with pytest.raises(ValueError):
        MeasurementPolicy(probe_bytes=10)
    with pytest.raises(ValueError):
        MeasurementPolicy(num_pings=0)
