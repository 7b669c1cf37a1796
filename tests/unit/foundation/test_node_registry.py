"""Registry liveness with a fake clock, persistence across restarts."""

import pytest

from coordinator.registry import NodeRegistry
from coordinator.store import Database
from swarm.clock import FakeClock
from swarm.errors import NotFoundError
from swarm.hardware import HardwareInfo

HW = HardwareInfo(device="cpu", device_kind="cpu", device_name="test cpu", memory_bytes=8 << 30,
                  memory_free_bytes=4 << 30, cpu_cores=4, ram_bytes=8 << 30, disk_free_bytes=1 << 40,
                  tflops=0.5, tflops_dtype="float32")


def _register(reg, node_id="a" * 32, name="n0"):
    return reg.register(node_id=node_id, name=name, public_key=b"k" * 32, peer_address="127.0.0.1:1", hardware=HW)


def test_online_then_lost_after_timeout(tmp_path):
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    _register(reg)
    assert reg.snapshot()[0].state == "online"
    clock.advance(2.0)
    reg.heartbeat("a" * 32, status="idle")
    clock.advance(5.9)
    assert reg.sweep() == []
    assert reg.snapshot()[0].state == "online"
    clock.advance(0.2)
    # snapshot applies the rule even before the sweeper runs
    assert reg.snapshot()[0].state == "lost"
    assert reg.sweep() == ["a" * 32]
    assert reg.sweep() == []


def test_heartbeat_brings_lost_node_back(tmp_path):
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    _register(reg)
    clock.advance(10)
    reg.sweep()
    reg.heartbeat("a" * 32, metrics={"stage": 1})
    node = reg.get("a" * 32)
    assert node.state == "online" and node.metrics == {"stage": 1}


def test_leave_is_left_and_never_lost(tmp_path):
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    _register(reg)
    reg.leave("a" * 32)
    clock.advance(100)
    assert reg.sweep() == []
    assert reg.snapshot()[0].state == "left"


def test_unknown_node_heartbeat_is_not_found(tmp_path):
    reg = NodeRegistry(Database(tmp_path), FakeClock(), node_timeout_s=6.0)
    with pytest.raises(NotFoundError):
        reg.heartbeat("b" * 32)


def test_state_survives_restart(tmp_path):
    clock = FakeClock()
    reg = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    _register(reg, "a" * 32, "n0")
    _register(reg, "b" * 32, "n1")
    reg.heartbeat("a" * 32, metrics={"bytes_sent": 10}, memory_free_bytes=1 << 30)
    reg.leave("b" * 32)
    reg.close()
    reg2 = NodeRegistry(Database(tmp_path), clock, node_timeout_s=6.0)
    nodes = {n.id: n for n in reg2.snapshot()}
    assert nodes["a" * 32].state == "online"
    assert nodes["a" * 32].metrics == {"bytes_sent": 10}
    assert nodes["a" * 32].hardware.memory_free_bytes == 1 << 30
    assert nodes["b" * 32].state == "left"
    assert reg2.public_key("a" * 32) == b"k" * 32
    clock.advance(7)
    assert reg2.sweep() == ["a" * 32]


def test_join_token_is_kept_in_sqlite_and_file(tmp_path):
    import os
    import stat

    from coordinator.app import TOKEN_FILE, load_or_create_token

    db = Database(tmp_path)
    token = load_or_create_token(db, tmp_path)
    assert len(token) >= 16
    assert load_or_create_token(Database(tmp_path), tmp_path) == token
    assert (tmp_path / TOKEN_FILE).read_text().strip() == token
    assert stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    (tmp_path / TOKEN_FILE).unlink()
    assert load_or_create_token(db, tmp_path) == token  # SQLite alone is enough
    assert load_or_create_token(db, tmp_path, "given-token-0123456789") == "given-token-0123456789"
    assert load_or_create_token(db, tmp_path) == "given-token-0123456789"
