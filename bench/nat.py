"""What NAT costs a training job: the same job with its nodes at home, direct, punched and relayed.

    sudo python -m bench.nat                      # 100 Mbit/s, 3 home nodes, records to docs/benchmarks.md
    sudo python -m bench.nat --rate-mbit 100 --steps 8 --repeats 2
    python -m bench.nat --relay-cpu-only          # relay CPU per Gbit/s only (no root needed)

Topology (tests/helpers/nat.py): the coordinator in a public namespace; each node in its own home
namespace whose WAN link is shaped with tc tbf at ``--rate-mbit`` both ways. Three settings, the
same job (bench/pipeline.py's model, one stage per node):

- direct: homes without NAT (public addresses on the same shaped links): every node is dialled;
- punched: homes behind NAT routers (MASQUERADE, inbound dropped): the nodes are relayed by the
  coordinator and punch holes to each other (swarm/transport/punch.py), so every pipeline link
  is a punched TCP connection;
- relayed: the same, nodes started with --no-hole-punching: every byte goes through the relay.

tokens/s as bench/pipeline.py measures it (warm steps, last stage's clock), best of ``--repeats``
interleaved rounds. Relay CPU: a relay process forwards ``--relay-gbytes`` of opaque bytes from a
peer socket to a dialled-back node socket on loopback; its user+system CPU seconds per Gbit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record  # noqa: E402
from bench.pipeline_swarm import measure, prepare_inputs, run_job  # noqa: E402
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until  # noqa: E402
from swarm.transport.coordinator_client import CoordinatorClient  # noqa: E402

TOKEN = "bench-nat-token-0123456789abcdef"
NODE = "ab" * 16  # the relay CPU benchmark's fake node id


class NatSwarm:
    """A coordinator in the public namespace and one node per home namespace (bench.pipeline_swarm's
    ``run_job`` / ``measure`` take it: ``client()`` and ``state_dir``)."""

    def __init__(self, root: Path, net, *, hole_punching: bool, threads: int) -> None:
        self.procs = []
        self.state_dir = root / "coord"
        args = ["--token", TOKEN, "--heartbeat-interval-s", "0.5", "--node-timeout-s", "10",
                "--probe-bytes", str(256 << 10), "--log-level", "INFO"]
        proc, ready = start_coordinator(self.state_dir, host="0.0.0.0", prefix=net.public.prefix, extra_args=args)
        self.procs.append(proc)
        self.address = f"{net.public_ip}:{ready['port']}"
        self.admin_token, self.read_token = ready["admin_token"], ready["read_token"]
        node_args = ["--probe-seconds", "0.2", "--log-level", "INFO"] + ([] if hole_punching else ["--no-hole-punching"])
        for i, home in enumerate(net.homes):
            p, _ = start_node(self.address, ready["token"], root / f"n{i}", host="0.0.0.0", prefix=home.prefix,
                              extra_args=node_args, env=child_env({"OMP_NUM_THREADS": str(threads)}))
            self.procs.append(p)
        n = len(net.homes)
        wait_until(lambda: sum(x.state == "online" and x.reachability != "pending"
                               for x in self.client().snapshot().nodes) == n, 60, message="nodes online")

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.address, token=self.admin_token)

    def paths(self) -> dict:
        """Link paths and node reachability as `swarm status --json` prints them."""
        from swarm.cli.status import status_json

        with self.client() as c:
            doc = status_json(c.snapshot())
        online = [n for n in doc["nodes"] if n["state"] == "online"]
        bws = [lk["bandwidth_Bps"] * 8 / 1e6 for lk in doc["links"] if lk.get("bandwidth_Bps")]
        rtts = [lk["rtt_s"] * 1e3 for lk in doc["links"] if lk.get("rtt_s")]
        return {"links": sorted({lk["path"] for lk in doc["links"]}),
                # the coordinator's own link measurements (probes and transfers over the path in use)
                "link_mbit_median": statistics.median(bws) if bws else None,
                "link_rtt_ms_median": statistics.median(rtts) if rtts else None,
                "nodes": sorted({n["reachability"] for n in online}),
                # hole punches as the nodes count them (heartbeat metrics, swarm/transport/punch.py)
                "punch_attempts": sum(int(n["metrics"].get("punch_attempts", 0)) for n in online),
                "punch_successes": sum(int(n["metrics"].get("punch_successes", 0)) for n in online)}

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def run_setting(name: str, args, root: Path, rep: int) -> dict:
    from tests.helpers.nat import nat_topology

    with nat_topology(num_homes=args.stages, rate=f"{args.rate_mbit:g}mbit", nat=name != "direct", skip=False) as net:
        swarm = NatSwarm(root / f"{name}-{rep}", net, hole_punching=name == "punched", threads=args.threads)
        try:
            job = run_job(swarm, root / "model", root / "data.txt", codec=args.codec, args=args)
            m = measure(swarm, job, warm_epochs=args.warm_epochs)
            m.update(setting=name, paths=swarm.paths())
            return m
        finally:
            swarm.close()


# ----------------------------------------------------------------------------- relay CPU
_RELAY_CHILD = f"""
import sys, threading
from swarm.transport.relay import RelayHub, RelayLimits, RelayServer
hub = RelayHub(RelayLimits(rate_Bps=1e12, burst_bytes=1 << 30))
port = RelayServer(hub, "127.0.0.1", 0).start()
q = hub.listen("{NODE}")
print("PORT", port, flush=True)
while True:
    ev = q.get()
    print("CID", ev.token.hex(), flush=True)
"""


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname=f"{NODE}.node.swarm")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def relay_cpu(total_bytes: int) -> dict:
    """Push ``total_bytes`` through a relay process on loopback; its CPU seconds per Gbit."""
    from swarm.transport.relay import MAGIC

    child = subprocess.Popen([sys.executable, "-c", _RELAY_CHILD], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        port = int(child.stdout.readline().split()[1])
        peer = socket.create_connection(("127.0.0.1", port))
        peer.sendall(_client_hello())
        cid = bytes.fromhex(child.stdout.readline().split()[1])
        node = socket.create_connection(("127.0.0.1", port))
        node.sendall(MAGIC + cid)
        got = [0]

        def sink():
            buf = bytearray(1 << 20)
            while (n := node.recv_into(buf)) > 0:
                got[0] += n

        t = threading.Thread(target=sink, daemon=True)
        t.start()
        chunk = os.urandom(1 << 20)
        cpu0, t0 = _cpu_s(child.pid), time.perf_counter()
        sent = 0
        while sent < total_bytes:
            peer.sendall(chunk)
            sent += len(chunk)
        peer.shutdown(socket.SHUT_WR)
        t.join(timeout=120)
        wall, cpu = time.perf_counter() - t0, _cpu_s(child.pid) - cpu0
        gbit = sent * 8 / 1e9
        return {"gbit": gbit, "wall_s": wall, "relay_cpu_s": cpu, "cpu_s_per_gbit": cpu / gbit,
                "throughput_gbps": gbit / wall, "received_ok": got[0] >= sent - len(_client_hello())}
    finally:
        child.kill()
        child.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.nat", description=__doc__.split("\n")[0])
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--settings", default="direct,punched,relayed")
    ap.add_argument("--codec", default="none")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm-epochs", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--job-timeout-s", type=float, default=300.0)
    ap.add_argument("--relay-gbytes", type=float, default=2.0)
    ap.add_argument("--relay-cpu-only", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    cpu = relay_cpu(int(args.relay_gbytes * 1e9))
    print(json.dumps(cpu), flush=True)
    cpu_row = [f"{cpu['gbit']:.1f} Gbit through the relay on loopback", f"{cpu['throughput_gbps']:.2f} Gbit/s",
               f"{cpu['cpu_s_per_gbit']:.2f} CPU-s per Gbit"]
    if args.relay_cpu_only:
        table = markdown_table(["transfer", "relay throughput", "relay CPU"], [cpu_row])
        print(table)
        if not args.no_record:
            record("Relay CPU per Gbit/s (bench/nat.py --relay-cpu-only)", table)
        return 0

    settings = [s for s in args.settings.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
        root = Path(tmp)
        cfg = prepare_inputs(args, root)
        best: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name in settings:
                m = run_setting(name, args, root, rep)
                print(json.dumps(m), flush=True)
                if name not in best or m["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = m
    base = best.get("direct", {}).get("tokens_per_s")
    rows = []
    for name in settings:
        m = best[name]
        p = m["paths"]
        punches = f"{p['punch_successes']}/{p['punch_attempts']}" if p.get("punch_attempts") else "-"
        link = f"{p['link_mbit_median']:.0f} / {p['link_rtt_ms_median']:.1f}" if p.get("link_mbit_median") else "-"
        rows.append([name, ",".join(p["links"]), punches, link, int(round(m["tokens_per_s"])),
                     f"{m['tokens_per_s'] / base:.3f}" if base else "-", f"{100 * (1 - m['tokens_per_s'] / base):.1f}%"
                     if base else "-", f"{100 * m['wait_frac']:.0f}%"])
    table = markdown_table(["setting", "link paths", "punches ok/tried", "links Mbit/s / RTT ms (median)", "tokens/s",
                            "vs direct", "cost vs direct", "network wait"], rows)
    table += "\n\n" + markdown_table(["transfer", "relay throughput", "relay CPU"], [cpu_row])
    notes = (f"{args.stages} nodes, one per home namespace, WAN links tc tbf {args.rate_mbit:g} Mbit/s both ways; "
             f"coordinator (and its relay) in the public namespace. Model: tiny GPT-2, {args.layers} layers, hidden "
             f"{args.hidden}, {cfg.num_parameters() / 1e6:.2f}M parameters, codec {args.codec}, {args.stages} stages, "
             f"1F1B, batch {args.batch_size} x {args.seq_len} in micro-batches of {args.micro_batch_size}, "
             f"{args.steps} steps, best of {args.repeats} interleaved round(s), warm steps only. Relay CPU: one "
             "relay process on loopback forwarding opaque bytes (user+system CPU seconds / Gbit sent). Punches: "
             "attempts and successes the nodes counted (each side of a punch counts once), best round. Links: "
             "median over the coordinator's measured links after the job (probes, raised by real transfers).")
    print(table)
    print(notes)
    if not args.no_record:
        record(f"NAT: direct vs punched vs relayed training at {args.rate_mbit:g} Mbit/s (bench/nat.py)", table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
