"""How well does the swarm measure links? Two namespaces joined by a veth shaped with
``tc tbf`` at several rates; a real coordinator and two real nodes (one per namespace); the
bandwidth and RTT the swarm reports over its peer service, both directions.

    python -m bench.link_measurement            (needs root and iproute2)
    python bench/link_measurement.py --rates 100mbit --no-record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record  # noqa: E402
from swarm.localswarm import start_coordinator, start_node, wait_until  # noqa: E402
from tests.helpers.netns import NetnsUnavailable, shaped_pair  # noqa: E402

# rate -> (tbf burst, probe bytes): tbf needs a burst of about rate/HZ to reach high rates;
# the probe lasts about 0.5-2 s at each rate.
SETTINGS = {
    "10mbit": ("32kbit", 2 << 20),
    "100mbit": ("32kbit", 8 << 20),
    "1gbit": ("10mbit", 64 << 20),
}


def _rate_bps(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, mult in units.items():
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * mult
    raise ValueError(f"unknown rate {rate}")


def measure_at(rate: str, workdir: Path) -> list[list[object]]:
    burst, probe_bytes = SETTINGS[rate]
    rows = []
    with shaped_pair(rate=rate, burst=burst, latency="400ms", skip=False) as net:
        procs = []
        try:
            coord, ready = start_coordinator(workdir / "coord", host="0.0.0.0", prefix=net.prefix_a, extra_args=[
                "--heartbeat-interval-s", "0.5", "--probe-bytes", str(probe_bytes), "--num-pings", "9",
                "--log-level", "WARNING"])
            procs.append(coord)
            address = f"{net.ip_a}:{ready['port']}"
            ids = {}
            for name, prefix in (("a", net.prefix_a), ("b", net.prefix_b)):
                proc, fields = start_node(address, ready["token"], workdir / name, name=name, host="0.0.0.0",
                                          prefix=prefix, extra_args=["--probe-seconds", "0.1", "--log-level", "WARNING"])
                procs.append(proc)
                ids[fields["node_id"]] = name
            # the coordinator listens in namespace a: ask from there
            def links():
                out = subprocess.run([*net.prefix_a, sys.executable, "-m", "swarm.cli", "status", "--coordinator",
                                      address, "--json"], capture_output=True, text=True, timeout=60)
                got = [l for l in json.loads(out.stdout)["links"] if l["src"] in ids and l["dst"] in ids]
                return got if len(got) == 2 else None

            t0 = time.monotonic()
            got = wait_until(links, 120, interval_s=0.5, message="both directions measured")
            elapsed = time.monotonic() - t0
            expected = _rate_bps(rate)
            for link in sorted(got, key=lambda l: ids[l["src"]]):
                mbps = link["bandwidth_Bps"] * 8 / 1e6
                rows.append([f"{rate} (burst {burst})", f"{ids[link['src']]}->{ids[link['dst']]}", probe_bytes >> 20,
                             round(mbps, 1), f"{(link['bandwidth_Bps'] * 8 - expected) / expected * 100:+.1f}%",
                             round(link["rtt_s"] * 1e3, 3), round(elapsed, 1)])
        finally:
            for p in reversed(procs):
                p.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = []
    try:
        for rate in args.rates:
            with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
                rows += measure_at(rate, Path(tmp))
    except NetnsUnavailable as exc:
        print(f"link_measurement: {exc}", file=sys.stderr)
        return 2
    headers = ["tbf rate", "direction", "probe MiB", "measured Mbit/s", "error vs rate", "RTT ms",
               "time to both links s"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_record:
        record("Link measurement over tbf-shaped veth (bench/link_measurement.py)", table, notes=(
            "Measured bandwidth counts payload bytes; tbf shapes whole Ethernet frames, so ~4-5% below the rate "
            "is the expected header overhead (1448 payload bytes per 1514-byte frame). No netem here: RTT is "
            "the veth's own."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
