"""``swarm status --coordinator HOST:PORT [--json]``: nodes and the measured network.

``--json`` prints one object: ``{"nodes": [{"id", "name", "state", "device", "memory_bytes",
"tflops", "mem_bandwidth_Bps" (bytes/s; null: not measured), "mem_bandwidth_seen_Bps" (what its decode steps
showed, a lower bound; null: none seen), "mem_bandwidth_planning_Bps" (what placement believes), "measured_tflops", "quarantine_reason", "slow_reason", "last_seen_s", ...}], "links": [{"src", "dst", "bandwidth_Bps", "delay_s",
"measured_at", ...}]}`` (``last_seen_s``: seconds since the node was last heard from).
"""

from __future__ import annotations

import argparse
import json
import sys

from swarm.cli.common import add_common_flags, connect
from swarm.errors import SwarmError
from swarm.membership import link_json, link_paths, node_json
from swarm.reachability import effective_reachability


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("status", help="show the swarm's nodes and network")
    add_common_flags(p, json=True, json_help="print one JSON object")
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.set_defaults(func=run)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def status_json(snapshot) -> dict:
    now = snapshot.server_time_s
    path = link_paths(snapshot.nodes)
    return {
        "nodes": [node_json(n, now) for n in snapshot.nodes],
        "links": [link_json(link, path) for link in snapshot.links],
    }


def render_table(snapshot) -> str:
    now = snapshot.server_time_s
    nodes = snapshot.nodes
    rows = [("NAME", "ID", "STATE", "REACHABILITY", "DEVICE", "MEMORY", "TFLOPS", "MEM BW", "LAST SEEN")]
    for n in nodes:
        hw = n.hardware
        reach = effective_reachability(n.reachability, n.metrics) + \
            (f" via {n.relay_node_id[:12]}" if n.relay_node_id else "")
        rows.append((n.name, n.id[:12], n.state, reach, f"{hw.device} {hw.device_name}"[:40], _bytes(hw.memory_bytes),
                     f"{hw.tflops:.3f} {hw.tflops_dtype}",
                     f"{hw.mem_bandwidth_Bps / 1e9:.1f} GB/s" if hw.mem_bandwidth_Bps > 0 else "-", f"{max(0.0, now - n.last_seen_at_s):.1f} s ago"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"{len(nodes)} nodes ({sum(n.state == 'online' for n in nodes)} online)"]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    online = [n for n in nodes if n.state == "online"]
    links = {(link.src, link.dst): link for link in snapshot.links}
    path = link_paths(nodes)
    if len(online) >= 2:
        names = [n.name[:14] for n in online]
        w = max(14, *(len(x) for x in names))
        for title, fmt in (("bandwidth (Mbit/s), row = from, column = to", lambda l: f"{l.bandwidth_Bps * 8 / 1e6:.1f}"),
                           ("delay (ms, one way = RTT/2)", lambda l: f"{l.delay_s * 1e3:.2f}")):
            out.append("")
            out.append(title)
            out.append(" " * w + "  " + "  ".join(x.rjust(w) for x in names))
            for a, name in zip(online, names):
                cells = []
                for b in online:
                    link = links.get((a.id, b.id))
                    how = path(a.id, b.id)
                    mark = "" if how == "direct" else f" ({how[0]})"  # (r) relayed, (p) punched
                    cells.append(("-" if a.id == b.id else "?" if link is None else fmt(link) + mark).rjust(w))
                out.append(name.ljust(w) + "  " + "  ".join(cells))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    try:
        with connect(args, timeout_s=args.timeout_s) as client:
            snapshot = client.snapshot()
    except SwarmError as exc:
        print(f"swarm status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status_json(snapshot), indent=2))
    else:
        print(render_table(snapshot))
    return 0
