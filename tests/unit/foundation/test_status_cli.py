"""`swarm status` output: the JSON keys the issue fixes, the table, and an unreachable coordinator."""

import argparse
import json
import socket

from swarm.cli import status
from swarm.hardware import HardwareInfo
from swarm.membership import Link, NodeInfo
from swarm.transport.coordinator_client import SwarmSnapshot

HW = HardwareInfo(device="cuda:0", device_kind="cuda", device_name="NVIDIA H100", memory_bytes=80 << 30,
                  memory_free_bytes=79 << 30, compute_capability="9.0", cpu_cores=16, ram_bytes=128 << 30,
                  disk_free_bytes=1 << 40, tflops=612.5, tflops_dtype="bfloat16")


def snapshot():
    nodes = tuple(NodeInfo(id=c * 32, name=f"gpu-{c}", state=s, hardware=HW, peer_address="10.0.0.1:7100",
                           registered_at_s=100.0, last_seen_at_s=95.0) for c, s in (("a", "online"), ("b", "online"), ("c", "lost")))
    links = (Link(src="a" * 32, dst="b" * 32, delay_s=0.02, rtt_s=0.04, bandwidth_Bps=12.5e6, measured_at_s=90.0),)
    return SwarmSnapshot(nodes=nodes, links=links, server_time_s=100.0)


def test_json_keys():
    doc = status.status_json(snapshot())
    assert set(doc) == {"nodes", "links"}
    node = doc["nodes"][0]
    assert {"id", "name", "state", "device", "memory_bytes", "tflops", "last_seen_s"} <= set(node)
    assert node["last_seen_s"] == 5.0 and node["device"] == "cuda:0" and node["tflops"] == 612.5
    assert [n["state"] for n in doc["nodes"]] == ["online", "online", "lost"]
    assert doc["links"] == [{"path": "direct", "src": "a" * 32, "dst": "b" * 32, "bandwidth_Bps": 12.5e6, "delay_s": 0.02,
                             "rtt_s": 0.04, "measured_at": 90.0, "source": "probe"}]
    json.dumps(doc, allow_nan=False)


def test_table_shows_nodes_and_matrix():
    text = status.render_table(snapshot())
    assert "3 nodes (2 online)" in text and "gpu-a" in text and "612.500 bfloat16" in text
    assert "100.0" in text  # 12.5 MB/s = 100 Mbit/s from a to b
    assert "?" in text  # b -> a never measured


def test_unreachable_coordinator_says_so(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the token (here: only its CA fingerprint) is how every command verifies the coordinator
    rc = status.run(argparse.Namespace(coordinator=f"127.0.0.1:{port}", token="swarm1." + "0" * 64, json=True,
                                       timeout_s=5.0))
    assert rc == 1
    assert "unreachable" in capsys.readouterr().err
