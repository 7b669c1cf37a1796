"""Coordinator and nodes as real subprocesses on loopback.

- 3 nodes appear with TFLOPS > 0 and a full bandwidth matrix; ``swarm status --json`` shows them;
- kill -9 of one node -> ``lost`` within ~10 s (default-like 6 s timeout);
- the coordinator restarts on the same state dir and port -> the live nodes re-register by
  themselves, the killed one stays lost;
- a node started before its coordinator says so, retries and joins; SIGTERM -> ``left``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from swarm.localswarm import child_env
from tests.helpers.procs import coordinator_proc, launch_coordinator, launch_node, require_online, wait_until

pytestmark = pytest.mark.multiproc

COORD_ARGS = ["--heartbeat-interval-s", "0.5", "--node-timeout-s", "6", "--probe-bytes", str(512 << 10),
              "--num-pings", "3"]


def _state(snapshot, node_id):
    return next((n.state for n in snapshot.nodes if n.id == node_id), None)


@pytest.mark.timeout(150)
def test_swarm_of_three_lost_node_and_coordinator_restart(tmp_path):
    coord = launch_coordinator(tmp_path / "coord", extra_args=COORD_ARGS)
    nodes = []
    try:
        nodes = [launch_node(coord, tmp_path / f"node{i}") for i in range(3)]
        ids = [n.node_id for n in nodes]
        snap = wait_until(lambda: (s := coord.snapshot()) and require_online(s, 3) and s, 60,
                          message="3 nodes online with a full bandwidth matrix")
        assert all(n.hardware.tflops > 0 for n in snap.nodes)
        assert {(link.src, link.dst) for link in snap.links} >= {(a, b) for a in ids for b in ids if a != b}

        # probes are peer traffic: each node sent 2 and received 2 probes of 512 KiB and reports its totals
        def traffic_reported():
            nodes_json = coord.get_json("/api/nodes")["nodes"]
            return all((n["bytes_sent"] or 0) >= 2 * (512 << 10) and (n["bytes_received"] or 0) >= 2 * (512 << 10)
                       for n in nodes_json)

        wait_until(traffic_reported, 20, message="traffic totals in /api/nodes")
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--coordinator", coord.address, "--token", coord.read_token, "--json"],
                             capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert {n["id"] for n in status["nodes"]} == set(ids)
        for n in status["nodes"]:
            assert {"id", "name", "state", "device", "memory_bytes", "tflops", "last_seen_s"} <= set(n)
            assert n["state"] == "online" and n["tflops"] > 0
            assert n["bytes_sent"] >= 2 * (512 << 10) and n["bytes_received"] >= 2 * (512 << 10)
        assert len(status["links"]) == 6
        for link in status["links"]:
            assert {"src", "dst", "bandwidth_Bps", "delay_s", "measured_at"} <= set(link)
            assert link["bandwidth_Bps"] > 0 and link["delay_s"] > 0

        # kill -9: no goodbye; lost after the 6 s timeout, well within 10 s
        nodes[2].proc.kill()
        t0 = time.monotonic()
        wait_until(lambda: _state(coord.snapshot(), ids[2]) == "lost", 10, interval_s=0.2,
                   message="killed node marked lost")
        assert time.monotonic() - t0 <= 10
        assert _state(coord.snapshot(), ids[0]) == "online"

        # restart the coordinator on the same state dir and port
        port, http_port = coord.port, coord.http_port
        coord.proc.stop()
        restart_at = time.time()
        coord = launch_coordinator(tmp_path / "coord", port=port, http_port=http_port, extra_args=COORD_ARGS)

        def back():
            s = coord.snapshot()
            by_id = {n.id: n for n in s.nodes}
            return all(by_id[i].state == "online" and by_id[i].registered_at_s >= restart_at for i in ids[:2]) and s

        snap = wait_until(back, 30, message="live nodes re-registered after the restart")
        assert _state(snap, ids[2]) == "lost"
        # measurements survived in SQLite
        assert len([link for link in snap.links if link.src in ids and link.dst in ids]) >= 6
        for n in nodes[:2]:
            assert n.proc.alive()
    finally:
        for n in nodes:
            n.proc.stop()
        coord.proc.stop()


@pytest.mark.timeout(90)
def test_node_waits_for_unreachable_coordinator_and_leaves_cleanly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the token pins the coordinator's CA: create it (and print the token) before the coordinator runs
    token = subprocess.run([sys.executable, "-m", "coordinator.cli", "token", "--state-dir", str(tmp_path / "coord"),
                            "--token", "t" * 32], capture_output=True, text=True, timeout=60, env=child_env(),
                           check=True).stdout.strip()
    # READY comes only after registration: wait for STARTED (serving, not yet registered)
    node = launch_node(f"127.0.0.1:{port}", tmp_path / "early", token=token, wait_for="STARTED")
    try:
        wait_until(lambda: "unreachable" in node.proc.log_tail(20000), 20, message="node says the coordinator is unreachable")
        assert node.proc.alive()
        with coordinator_proc(tmp_path / "coord", port=port,
                              extra_args=[*COORD_ARGS, "--token", "t" * 32]) as coord:
            wait_until(lambda: _state(coord.snapshot(), node.node_id) == "online", 30, message="node joined")
            rc = node.proc.stop()
            assert rc == 0
            wait_until(lambda: _state(coord.snapshot(), node.node_id) == "left", 5, message="node left cleanly")
    finally:
        node.proc.stop()


@pytest.mark.timeout(60)
def test_wrong_token_node_exits_with_advice(tmp_path):
    with coordinator_proc(tmp_path / "coord", extra_args=COORD_ARGS) as coord:
        node = launch_node(coord, tmp_path / "bad", token="not-the-token", wait_for="STARTED")
        try:
            node.proc.proc.wait(timeout=30)
            assert node.proc.proc.returncode == 1
            assert "wrong join token" in node.proc.log_tail()
            # READY (stdout) only after an accepted registration
            assert not any(line.startswith("READY") for line in node.proc.lines)
            assert coord.snapshot().nodes == ()
        finally:
            node.proc.stop()
