"""A coordinator and two nodes in two network namespaces joined by a veth shaped with
``tc qdisc ... tbf rate 100mbit burst 32kbit latency 400ms``: the bandwidth the swarm
measures (over the peer service) is within 15% of 100 Mbit/s in both directions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarm.localswarm import child_env, start_coordinator, start_node, wait_until
from tests.helpers.netns import shaped_pair

pytestmark = pytest.mark.netns

RATE_BPS = 100e6 / 8


def _status(prefix, address, token):
    out = subprocess.run([*prefix, sys.executable, "-m", "swarm.cli", "status", "--coordinator", address,
                          "--token", token, "--json"],
                         capture_output=True, text=True, timeout=60, env=child_env())
    if out.returncode != 0:
        raise OSError(out.stderr)
    return json.loads(out.stdout)


@pytest.mark.timeout(120)
def test_measured_bandwidth_matches_tbf_rate(tmp_path):
    with shaped_pair(rate="100mbit", burst="32kbit", latency="400ms") as net:
        procs = []
        try:
            coord, ready = start_coordinator(
                tmp_path / "coord", host="0.0.0.0", prefix=net.prefix_a,
                extra_args=["--heartbeat-interval-s", "0.5", "--probe-bytes", str(8 << 20), "--num-pings", "5"],
            )
            procs.append(coord)
            address = f"{net.ip_a}:{ready['port']}"
            a, fa = start_node(address, ready["token"], tmp_path / "a", name="a", host="0.0.0.0", prefix=net.prefix_a,
                               extra_args=["--probe-seconds", "0.1"])
            procs.append(a)
            b, fb = start_node(address, ready["token"], tmp_path / "b", name="b", host="0.0.0.0", prefix=net.prefix_b,
                               extra_args=["--probe-seconds", "0.1"])
            procs.append(b)
            ids = {fa["node_id"], fb["node_id"]}

            def measured():
                s = _status(net.prefix_a, address, ready["read_token"])
                links = [link for link in s["links"] if {link["src"], link["dst"]} == ids]
                return links if len(links) == 2 else None

            links = wait_until(measured, 60, interval_s=0.5, message="both directions measured")
            for link in links:
                error = abs(link["bandwidth_Bps"] - RATE_BPS) / RATE_BPS
                print(f"measured {link['bandwidth_Bps'] * 8 / 1e6:.1f} Mbit/s, rtt {link['rtt_s'] * 1e3:.2f} ms")
                assert error <= 0.15, f"measured {link['bandwidth_Bps'] * 8 / 1e6:.1f} Mbit/s over a 100 Mbit/s link"
                # the peer addresses are the namespaces' own: traffic crossed the shaped veth
            nodes = {n["id"]: n for n in _status(net.prefix_a, address, ready["read_token"])["nodes"]}
            assert nodes[fb["node_id"]]["peer_address"].startswith(net.ip_b + ":")
            assert nodes[fa["node_id"]]["peer_address"].startswith(net.ip_a + ":")
        finally:
            for p in reversed(procs):
                p.stop()
