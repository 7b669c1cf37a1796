"""Training throughput of a real swarm: node processes (optionally each in its own network
namespace behind `tc tbf` shaped links) train the same model with several boundary codecs.

    python -m bench.pipeline                          # loopback + tbf 100 Mbit/s and 1 Gbit/s (needs root)
    python -m bench.pipeline --rates 100 --codecs none,aqsgd:fw=4,bw=8
    python -m bench.pipeline --device cuda --no-netns --hidden 1024 --layers 12   # GPU, loopback

For every link setting and codec a job runs through `swarm train`'s service (coordinator
planning, stage workers, gRPC peer-to-peer tensors). Measured over the steps after the first
``--warm-epochs`` epochs (AQ-SGD's cache is warm then):

- tokens/s = tokens of those steps / the sum of their step times (the last stage's clock);
- bytes per step per link = (activations stage k -> k+1 + gradients k+1 -> k) per step;
- network-wait fraction = time stages spent blocked waiting for a neighbour's tensor / step time
  (mean over stages);
- compute-only bound = the same processes and job on unshaped loopback with codec `none`;
- baseline = a plain single-process torch loop (bench/baselines.py: same model, batch,
  micro-batches with gradient accumulation, AdamW, dtype, device) run in the same invocation,
  with as many torch threads as all node processes together (capped at the machine's cores);
  every row prints its ratio to it.

    python -m bench.pipeline --quick --json           # CPU, loopback, < 3 minutes, one JSON object
    python -m bench.pipeline --device cuda --no-netns --layers 6 --hidden 1024 --heads 16 \
        --seq-len 256 --batch-size 16 --micro-batch-size 4 --num-samples 32 --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until
from swarm.transport.channels import control_channel
from swarm.transport.coordinator_client import CoordinatorClient
from swarm.transport.tls import BENCH_PLAINTEXT_ENV, PlaintextSecurity

TOKEN = "bench-pipeline-token-0123456789abcdef"
SUBNET = "10.78"  # + ".<pid-derived byte>": this swarm's /24 (Swarm.subnet)


def corpus(min_chars: int) -> str:
    """Plain text from CPython's standard library (available offline)."""
    import json as _json

    out, n = [], 0
    for path in sorted(Path(_json.__file__).parent.parent.glob("*.py")):
        text = path.read_text(errors="replace")
        out.append(text)
        n += len(text)
        if n >= min_chars:
            break
    return "\n".join(out)[:min_chars]


class _PlaintextClient(CoordinatorClient):
    """BENCHMARK ONLY: the client of a swarm started with SWARM_BENCH_PLAINTEXT=1."""

    def _connect(self):
        return control_channel(self.address, security=PlaintextSecurity("bench-user"))


class Swarm:
    """A coordinator and nodes as processes; with ``rate_mbit`` each node lives in a network
    namespace whose veth pair is shaped with tbf both ways (a hop crosses two shaped links)."""

    def __init__(self, root: Path, num_nodes: int, *, device: str, rate_mbit: float | None, threads: int,
                 emulate_mbit: float | None = None, plaintext: bool = False) -> None:
        self.procs, self.netns, self.rate_mbit = [], [], rate_mbit
        self.plaintext = plaintext
        # plaintext: the benchmark-only switch (SWARM_BENCH_PLAINTEXT=1, swarm/transport/tls.py) that
        # measures what TLS costs; every process of this swarm gets it, nothing else can.
        extra_env = {BENCH_PLAINTEXT_ENV: "1"} if plaintext else {}
        self.root = root
        # names and subnet carry the pid: concurrent runs (tests, benchmarks) do not collide, and
        # what a killed run left behind does not make the next one fail
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = f"{SUBNET}.{os.getpid() % 250}"
        host = "127.0.0.1"
        if rate_mbit:
            host = f"{self.subnet}.1"
            try:
                self._setup_netns(num_nodes, rate_mbit)
            except BaseException:
                self._teardown_netns()
                raise
        coord_args = ["--token", TOKEN, "--heartbeat-interval-s", "0.5", "--node-timeout-s", "10",
                      "--probe-bytes", str(256 << 10), "--log-level", "INFO"]
        proc, ready = start_coordinator(root / "coord", host="0.0.0.0" if rate_mbit else host, extra_args=coord_args,
                                        env=child_env(extra_env))
        self.procs.append(proc)
        self.token = ready["token"]  # the join token, swarm1.<CA fingerprint>.<TOKEN>: nodes
        self.admin_token = ready["admin_token"]  # submits jobs and reads
        self.address = f"{host}:{ready['port']}"
        self.local_address = f"127.0.0.1:{ready['port']}"
        self.http = f"http://127.0.0.1:{ready['http_port']}"
        self.state_dir = root / "coord"
        for i in range(num_nodes):
            prefix = ["ip", "netns", "exec", self.netns[i]] if rate_mbit else []
            node_host = f"{self.subnet}.{i + 2}" if rate_mbit else "127.0.0.1"
            node_device = device.split(",")[i % len(device.split(","))]  # a comma list: node i on the i-th
            p, _ = start_node(self.address, self.token, root / f"n{i}", device=node_device, host=node_host, prefix=prefix,
                              extra_args=["--probe-seconds", "0.2", "--log-level", "INFO"],
                              env=child_env({"OMP_NUM_THREADS": str(threads),
                                             "SWARM_EMULATE_LINK_MBIT": str(emulate_mbit or 0), **extra_env}))
            self.procs.append(p)
        wait_until(lambda: sum(n.state == "online" for n in self.client().snapshot().nodes) == num_nodes,
                   timeout_s=60, message="all nodes online")

    def client(self) -> CoordinatorClient:
        """A client with the admin token; in the plaintext benchmark mode, over plaintext."""
        if self.plaintext:
            return _PlaintextClient(self.local_address, token=self.admin_token)
        return CoordinatorClient(self.local_address, token=self.admin_token)

    def _dev(self, kind: str, i: int | None = None) -> str:
        """This swarm's name of a bridge ("b"), host-side veth ("v") or namespace-side veth ("p")."""
        return f"sw{kind}{self.tag}" + ("" if i is None else f"_{i}")  # at most 12 characters (limit 15)

    def _setup_netns(self, n: int, rate_mbit: float) -> None:
        def sh(*cmd: str) -> None:
            subprocess.run(cmd, check=True, capture_output=True)

        br = self._dev("b")
        sh("ip", "link", "add", br, "type", "bridge")
        self._bridge = br
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", br)
        sh("ip", "link", "set", br, "up")
        burst = max(int(rate_mbit * 1e6 / 8 / 250), 16000)  # 4 ms of traffic, at least 16 kB
        for i in range(n):
            ns, veth, peer = f"swt{self.tag}_{i}", self._dev("v", i), self._dev("p", i)
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", veth, "master", br)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{i + 2}/24", "dev", peer)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            for dev, pre in ((veth, []), (peer, ["ip", "netns", "exec", ns])):
                sh(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                   "burst", str(burst), "latency", "100ms")

    def _teardown_netns(self) -> None:
        for i, ns in enumerate(self.netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", self._dev("v", i)], capture_output=True)
        self.netns = []
        if getattr(self, "_bridge", None):
            subprocess.run(["ip", "link", "del", self._bridge], capture_output=True)
            self._bridge = None

    def set_rate(self, rate_mbit: float | None) -> None:
        """Re-shape every veth to ``rate_mbit`` (None: remove shaping) without restarting anything."""
        if not self.netns:
            if rate_mbit:
                raise ValueError("this swarm runs on loopback; it cannot be shaped")
            return
        burst = max(int((rate_mbit or 0) * 1e6 / 8 / 250), 16000)
        for i, ns in enumerate(self.netns):
            for dev, pre in ((self._dev("v", i), []), (self._dev("p", i), ["ip", "netns", "exec", ns])):
                subprocess.run([*pre, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
                if rate_mbit:
                    subprocess.run([*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                                    "burst", str(burst), "latency", "100ms"], check=True, capture_output=True)
        self.rate_mbit = rate_mbit

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self._teardown_netns()


def run_job(swarm: Swarm, model: Path, data: Path, *, codec: str, args) -> dict:
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.job_spec import JobSpec

    spec = JobSpec(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                   seq_len=args.seq_len, lr=1e-3, codec=CodecSpec.parse(codec), num_stages=args.stages, num_replicas=1,
                   peer_timeout_s=120.0, schedule="1f1b", checkpoint_every=0)
    with swarm.client() as client:
        job = client.submit_job(spec, upload_files(model, data))
        deadline = time.monotonic() + args.job_timeout_s
        while not job.terminal:
            if time.monotonic() > deadline:
                client.cancel_job(job.id, "benchmark timeout")
                raise TimeoutError(f"job with codec {codec} did not finish in {args.job_timeout_s} s")
            time.sleep(0.5)
            job = client.get_job(job.id)
    if job.state != "succeeded":
        raise RuntimeError(f"job with codec {codec} {job.state}: {job.reason}")
    return job.detail


def measure(swarm: Swarm, job: dict, *, warm_epochs: float) -> dict:
    """Warm-step metrics from the coordinator's progress rows (see the module docstring)."""
    steps_per_epoch = job["num_samples"] // job["spec"]["batch_size"]
    warm_from_step = int(math.ceil(warm_epochs * steps_per_epoch))
    conn = sqlite3.connect(swarm.state_dir / "coordinator.sqlite3")
    rows = conn.execute(
        "SELECT stage, step, loss, tokens, bytes_forward, bytes_backward, step_s, wait_s FROM job_progress "
        "WHERE job_id = ? AND step >= ?", (job["id"], warm_from_step)).fetchall()
    conn.close()
    stages = job["plan"]["d_pp"]
    last = [r for r in rows if r[0] == stages - 1]
    steps = len(last)
    tokens = sum(r[3] for r in last)
    time_s = sum(r[6] for r in last)
    fw = {s: sum(r[4] for r in rows if r[0] == s) / max(1, steps) for s in range(stages)}
    bw = {s: sum(r[5] for r in rows if r[0] == s) / max(1, steps) for s in range(stages)}
    per_link = [fw[k] + bw[k + 1] for k in range(stages - 1)]  # link k joins stage k and k+1
    wait = statistics.mean(r[7] / r[6] for r in rows if r[6] > 0)
    losses = [r[2] for r in sorted(last, key=lambda r: r[1]) if r[2] is not None]
    return {"tokens_per_s": tokens / time_s if time_s else 0.0, "bytes_per_link_step": per_link, "wait_frac": wait,
            "steps": steps, "final_loss": losses[-1] if losses else float("nan"), "warm_from_step": warm_from_step}


def prepare_inputs(args, root: Path):
    """The tiny model and a corpus cut to about ``args.num_samples`` windows; returns its config."""
    from swarm.model.testing import make_tiny_checkpoint
    from swarm.model.tokenizer import load_tokenizer

    cfg = make_tiny_checkpoint(root / "model", num_layers=args.layers, hidden_size=args.hidden,
                               num_heads=args.heads, max_position_embeddings=max(512, args.seq_len))
    tok = load_tokenizer(root / "model")
    text = corpus(200_000)
    ids = tok.encode(text)
    need = args.num_samples * args.seq_len + 1
    if len(ids) < need:
        raise SystemExit(f"corpus too short: {len(ids)} tokens < {need}")
    cut = int(len(text) * need / len(ids) * 1.02)  # a little over: the job drops what a batch cannot fill
    (root / "data.txt").write_text(text[:cut])
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,1000", help="tbf rates in Mbit/s (comma list); needs root, ip, tc")
    ap.add_argument("--no-netns", action="store_true", help="loopback only (compute-only bound and codecs)")
    ap.add_argument("--codecs", default="none|direct:fw=8,bw=8|aqsgd:fw=4,bw=8|aqsgd:fw=2,bw=4",
                    help="codecs separated by '|' (',' belongs to a spec)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=64, help="dataset size in windows (epochs = steps * B / this)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; each configuration keeps its best")
    ap.add_argument("--warm-epochs", type=float, default=2.0, help="skip the steps of the first epochs")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the nodes and the baseline; a comma list (cuda:0,cuda:1) puts node i on the "
                         "i-th (cycling) and the baseline on the first, and prints the ideal 1F1B speed-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node process")
    ap.add_argument("--job-timeout-s", type=float, default=300.0)
    ap.add_argument("--emulate", action="store_true",
                    help="no netns: emulate --rates in the senders (hosts without tc, e.g. gVisor GPU machines)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--record-to", default=None, help="append the section to this file instead of docs/benchmarks.md")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--paired", action="store_true",
                    help="with --tls-cost (loopback or --emulate): run the TLS and the plaintext swarm side by side, "
                         "each job on both at once, so both see the same load from the rest of the machine")
    ap.add_argument("--tls-cost", action="store_true",
                    help="measure what TLS costs: each configuration with TLS and with the benchmark-only plaintext "
                         "mode (SWARM_BENCH_PLAINTEXT=1), tokens/s of both and their ratio")
    ap.add_argument("--json", action="store_true", help="print one JSON object (baseline and runs) on stdout")
    ap.add_argument("--quick", action="store_true",
                    help="CPU loopback run in under 3 minutes: none and aqsgd:fw=4,bw=8, 6 x 128 model")
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="torch threads of the single-process baseline (default: stages x --threads, at most the "
                         "cores); it also runs with 1 thread and keeps the faster")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.no_netns, args.codecs = True, "none|aqsgd:fw=4,bw=8"
        args.layers, args.hidden, args.heads, args.seq_len = 6, 128, 4, 128
        args.batch_size, args.micro_batch_size, args.num_samples, args.steps = 16, 4, 32, 8
        args.warm_epochs, args.repeats = 1.0, 2
    if not args.baseline_threads:
        args.baseline_threads = max(1, min(args.stages * args.threads, os.cpu_count() or 1))
    out = sys.stderr if args.json else sys.stdout  # --json: stdout carries only the JSON object
    codecs = [c.strip() for c in args.codecs.split("|") if c.strip()]
    rates = [] if args.no_netns else [float(r) for r in args.rates.split(",") if r]

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        if args.tls_cost:
            from bench.pipeline_tls import tls_cost

            return tls_cost(args, root, codecs, rates)
        cfg = prepare_inputs(args, root)
        netns = bool(rates) and not args.emulate
        # netns: one swarm whose links are re-shaped between jobs. --emulate: one swarm per rate
        # (the rate is a node setting). Configurations are interleaved over --repeats rounds so
        # that they share the machine's conditions; each keeps its best (least disturbed) run.
        plan = [(None, "none")] if rates else [(None, c) for c in codecs]
        plan += [(r, c) for r in rates for c in codecs]
        best: dict[tuple, dict] = {}
        swarms: dict[float | None, Swarm] = {}

        def swarm_for(rate):
            key = rate if args.emulate else "one"
            if key not in swarms:
                for other in list(swarms):  # one swarm at a time: the processes share the machine
                    swarms.pop(other).close()
                swarms[key] = Swarm(root / f"swarm-{rate or 0:g}", args.stages, device=args.device,
                                    rate_mbit=rates[0] if netns else None, threads=args.threads,
                                    emulate_mbit=rate if args.emulate else None)
            return swarms[key]

        if args.emulate:  # group by rate so that each swarm starts once per round
            plan.sort(key=lambda rc: rc[0] or 0.0)
        baseline = None
        try:
            for rep in range(args.repeats):
                if not args.no_baseline:
                    from bench.baselines import train_loop

                    for th in sorted({1, args.baseline_threads}):
                        b = train_loop(root / "model", (root / "data.txt").read_text(), seq_len=args.seq_len,
                                       batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                                       num_samples=args.num_samples, steps=args.steps,
                                       warm_from_step=int(math.ceil(args.warm_epochs * (args.num_samples // args.batch_size))),
                                       lr=1e-3, device=args.device.split(",")[0], threads=th)
                        print(json.dumps({"baseline": b}), file=out, flush=True)
                        if baseline is None or b["tokens_per_s"] > baseline["tokens_per_s"]:
                            baseline = b
                for rate, codec in plan:
                    swarm = swarm_for(rate)
                    if netns:
                        swarm.set_rate(rate)
                    t0 = time.monotonic()
                    job = run_job(swarm, root / "model", root / "data.txt", codec=codec, args=args)
                    m = measure(swarm, job, warm_epochs=args.warm_epochs)
                    if rate:
                        name = f"{'emulated' if args.emulate else 'tbf'} {rate:g} Mbit/s"
                    else:
                        name = "unshaped veth" if netns else "loopback"
                    m.update(setting=name, codec=codec, wall_s=time.monotonic() - t0, num_samples=job["num_samples"])
                    print(json.dumps(m), file=out, flush=True)
                    key = (rate or 0.0, codec)
                    if key not in best or m["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = m
        finally:
            for sw in swarms.values():
                sw.close()
        results = [best[k] for k in sorted(best, key=lambda k: (k[0], codecs.index(k[1]) if k[1] in codecs else -1))]
    bound = next((r["tokens_per_s"] for r in results if r["setting"] in ("loopback", "unshaped veth")
                  and r["codec"] == "none"), None)
    none_at = {r["setting"]: r["tokens_per_s"] for r in results if r["codec"] == "none"}
    rows = []
    for r in results:
        rows.append([r["setting"], r["codec"], int(round(r["tokens_per_s"])),
                     " / ".join(f"{b / 1024:.0f}" for b in r["bytes_per_link_step"]),
                     f"{100 * r['wait_frac']:.0f}%",
                     f"{r['tokens_per_s'] / none_at[r['setting']]:.2f}x" if none_at.get(r["setting"]) else "-",
                     f"{100 * r['tokens_per_s'] / bound:.0f}%" if bound else "-", r["steps"],
                     round(r["final_loss"], 3)])
    base_tps = baseline["tokens_per_s"] if baseline else None
    for row, r in zip(rows, results):
        row.insert(3, f"{r['tokens_per_s'] / base_tps:.2f}x" if base_tps else "-")
    if baseline:
        rows.insert(0, ["single process (baseline)", "-", int(round(base_tps)), "1.00x", "-", "-", "-", "-",
                        baseline["steps"], round(baseline["final_loss"], 3)])
    headers = ["link", "codec", "tokens/s (warm)", "vs single process", "KiB per step per link", "network wait",
               "vs none", "vs compute bound", "warm steps", "loss"]
    table = markdown_table(headers, rows)
    print(table, file=out)
    notes = [
        f"Model: tiny GPT-2, {args.layers} layers, hidden {args.hidden}, {cfg.num_parameters() / 1e6:.2f}M parameters, "
        f"float32 on {args.device}; {args.stages} stages (one node process each, {args.threads} torch thread(s)), "
        f"1F1B, batch {args.batch_size} x {args.seq_len} tokens in micro-batches of {args.micro_batch_size}; "
        f"{results[0]['num_samples'] if results else '?'} samples, {args.steps} steps, metrics over steps >= "
        f"{results[0]['warm_from_step'] if results else '?'} "
        f"(after {args.warm_epochs:g} epoch(s): AQ-SGD cache warm).",
        (f"Baseline: the same model, batch, micro-batches (gradient accumulation), AdamW and device in one process "
         f"with 1 and with {args.baseline_threads} torch thread(s) (the node processes' threads together, at most the "
         f"machine's {os.cpu_count()} cores), the faster kept ({baseline['threads']} here) = {base_tps:.1f} tokens/s, "
         f"best of {args.repeats} rounds interleaved with the swarm runs."
         if base_tps else "No single-process baseline in this run."),
        "Compute-only bound: the same processes and job with codec none on unshaped links"
        + (f" = {bound:.1f} tokens/s." if bound else "."),
        ("Emulated links: each sender holds every tensor until it would have crossed a serial link of that rate "
         "(one per neighbour; no tc on this host), on loopback." if args.emulate else
         "tbf shapes both ends of every node's veth, so each hop crosses two shaped links at the given rate; "
         "a middle stage's activations and gradients share its one uplink."),
    ]
    if "," in args.device and base_tps:  # stages on their own devices: against the ideal 1F1B speed-up
        m = args.batch_size // args.micro_batch_size
        ideal = args.stages * m / (m + args.stages - 1)
        for r in results:
            got = r["tokens_per_s"] / base_tps
            notes.append(f"- {r['setting']} {r['codec']}: {got:.2f}x the one-device loop = {100 * got / ideal:.0f}% of the "
                         f"ideal 1F1B speed-up p*m/(m+p-1) = {ideal:.2f}x (p={args.stages} devices, m={m} micro-batches)")
    print("\n".join(notes), file=out)
    runs = [{"codec": r["codec"], "link": r["setting"], "tokens_per_s": r["tokens_per_s"],
             "ratio_to_baseline": r["tokens_per_s"] / base_tps if base_tps else None,
             "wait_frac": r["wait_frac"], "bytes_per_link_step": r["bytes_per_link_step"], "steps": r["steps"],
             "final_loss": r["final_loss"]} for r in results]
    if args.json:
        print(json.dumps({"baseline_tokens_per_s": base_tps, "baseline_threads": baseline["threads"] if baseline else None,
                          "device": args.device, "runs": runs}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"results": results, "headers": headers, "rows": rows}, default=str))
    if not args.no_record:
        how = "loopback" if not rates else ("emulated " if args.emulate else "tc tbf ") + "/".join(f"{r:g}" for r in rates) + " Mbit/s" + ("" if args.emulate else " netns")
        title = f"Training pipeline throughput ({args.device}, {how})"
        record(title, table, "\n".join(notes), doc=Path(args.record_to) if args.record_to else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
