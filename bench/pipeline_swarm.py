"""The swarm bench/pipeline.py drives (and bench/pipeline_tls.py, bench/nat.py, the netns tests):
a coordinator and node processes, optionally each node in its own network namespace behind
`tc tbf` shaped links; a job through it; and the warm-step metrics of its progress rows as
bench/pipeline.py's docstring defines them.
"""

from __future__ import annotations

import math
import os
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

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
    """Warm-step metrics from the coordinator's progress rows (see bench/pipeline.py's docstring)."""
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
