"""Inference benchmark: time to first token and tokens/s through 1, 2, 4-stage chains of real
node processes (loopback, or links shaped with `tc tbf` between network namespaces), next to
single-process generation with the same code and checkpoint; 1 and 8 concurrent sessions.

    python -m bench.inference                     # CPU, loopback, records to docs/benchmarks.md
    python -m bench.inference --device cuda --hidden 1024 --layers 24 --dtype float16
    python -m bench.inference --netns --rate-mbit 100   # needs root, ip, tc

Metrics: TTFT = request sent -> first token received by the client (prefill through the whole
chain + return). Decode tokens/s per session = (tokens - 1) / (last token - first token).
Aggregate tokens/s = all sessions' tokens / wall time from the first request to the last token.
Per-stage overhead = (per-token latency of k stages - that of 1 stage) / (k - 1).
Baseline: ``transformers``' ``generate`` on the same checkpoint (bench/baselines.py; same dtype,
device, KV cache, batch = sessions, greedy, exactly --new-tokens), in this process with
--baseline-threads torch threads, interleaved with the swarm runs; every row prints its
aggregate tokens/s as a ratio to it (at the same number of sessions).

    python -m bench.inference --quick --json      # CPU, loopback, 1 and 2 stages, < 3 minutes
    python -m bench.inference --device cuda --dtype float16 --family llama --layers 12 --hidden 1024 \
        --heads 16 --stages 1,2,4 --sessions 1,8 --new-tokens 64 --repeats 3 --max-seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._record import markdown_table, record
from swarm.inference.local import LocalChain
from swarm.inference.sampling import SamplingParams
from swarm.inference.stage_runtime import StageRuntime, StepEntry
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until
from swarm.model.checkpoint import load_stage
from swarm.model.testing import make_tiny_checkpoint
from swarm.transport.coordinator_client import CoordinatorClient, ServeOptions

BENCH_TOKEN = "bench-inference-token-0123456789"  # fixed: the bench serves models with it
PROMPT = "The swarm pools volunteer graphics cards over ordinary internet links to train and serve"


# ----------------------------------------------------------------------------- single process
def local_run(path: Path, num_layers: int, prompt_ids: list[int], new_tokens: int, sessions: int,
              device: str, dtype: torch.dtype, max_seq_len: int) -> dict:
    """Same StageRuntime code as a node, whole model in this process; sessions batched.
    Uses as many torch threads as a node process (BENCH_NODE_THREADS, default 1) for a fair comparison."""
    torch.set_num_threads(int(os.environ.get("BENCH_NODE_THREADS", "1")))
    stage = load_stage(path, 0, num_layers, is_first=True, is_last=True, device=device, dtype=dtype)
    rt = StageRuntime(stage, max_seq_len=max_seq_len, max_sessions=sessions)
    chain = LocalChain([rt])
    params = SamplingParams(max_new_tokens=new_tokens)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # warm-up: a few tokens per session, as the swarm's warm-up generation (kernels loaded; on a
    # GPU each batch cache's decode graph recorded, which the measured sessions reuse)
    warm = [f"w{i}" for i in range(sessions)]
    toks = chain.step([StepEntry(session_id=w, start_position=0, num_tokens=len(prompt_ids), token_ids=tuple(prompt_ids))
                       for w in warm])
    for pos in range(len(prompt_ids), len(prompt_ids) + 4):
        toks = chain.step([StepEntry(session_id=w, start_position=pos, num_tokens=1, token_ids=(t,))
                           for w, t in zip(warm, toks)])
    rt.close(warm)
    ids = [f"s{i}" for i in range(sessions)]
    t0 = time.perf_counter()
    toks = chain.step([StepEntry(session_id=s, start_position=0, num_tokens=len(prompt_ids), token_ids=tuple(prompt_ids),
                                 sampling=params) for s in ids])
    sync()
    t_first = time.perf_counter()
    pos = len(prompt_ids)
    for _ in range(new_tokens - 1):
        toks = chain.step([StepEntry(session_id=s, start_position=pos, num_tokens=1, token_ids=(t,), sampling=params)
                           for s, t in zip(ids, toks)])
        pos += 1
    sync()
    t_end = time.perf_counter()
    decode = (new_tokens - 1) / (t_end - t_first)
    return {"ttft_s": t_first - t0, "decode_tok_s": decode, "agg_tok_s": sessions * new_tokens / (t_end - t0),
            "ms_per_token": 1e3 / decode}


def trace_table(directory: Path, stages: list[int], sessions: list[int]) -> str:
    """Median milliseconds of each segment of a decode step's round trip, per configuration,
    from the swarm's SWARM_STEP_TRACE files (swarm/steptrace.py)."""
    from swarm.steptrace import hop_breakdown, read_traces

    records = [r for r in read_traces(directory) if r["key"][1] > 0]  # decode steps (prefill starts at 0)
    columns, cells = [], {}
    for k in stages:
        for s in sessions:
            picked = [r for r in records if r["model"] == f"bench-{k}" and r["entries"] == s]
            runs = {}  # one generation per first session: keep the fastest, as the table above keeps its best run
            for r in picked:
                runs.setdefault(r["key"][0], []).append(r)
            segs = [seg for seg in (hop_breakdown(rs, k) for rs in runs.values()) if seg]
            if not segs:
                continue
            seg = min(segs, key=lambda g: statistics.median(g["total"]))
            columns.append(f"{k} stage(s), {s} session(s)")
            for name, values in seg.items():
                cells.setdefault(name, {})[columns[-1]] = statistics.median(values)
    if not columns:
        return "Trace: no complete decode step was traced."
    k = max(stages)  # down the chain, then the replies back up
    order = (["coord->s0"] + [f"s{i} {what}" for i in range(k) for what in ("parse", "compute", "pack")]
             + [f"s{i}->s{i + 1}" for i in range(k - 1)] + [f"s{i} sample" for i in range(k)]
             + [x for i in reversed(range(k - 1)) for x in (f"s{i + 1}->s{i}", f"s{i} reply")] + ["s0->coord", "total"])
    order = [n for n in order if n in cells]
    rows = [[name] + [f"{cells[name][c]:.3f}" if c in cells[name] else "" for c in columns] for name in order]
    return ("\nWhere a decode step's time goes (median ms per decode step of the fastest traced run; "
            "`a->b` = message from a taken off b's stream; compute includes one device sync):\n\n"
            + markdown_table(["segment"] + columns, rows))


# ----------------------------------------------------------------------------- the swarm
def one_generation(address: str, model: str, new_tokens: int, out: list, barrier: threading.Barrier | None,
                   token: str | None = None) -> None:
    """One streamed generation. Its client connects first (the CA fetch and the TLS handshake, with
    a models listing): the clock starts after that, at the barrier, as a user's client is connected
    before it asks; connecting is not generating."""
    params = SamplingParams(max_new_tokens=new_tokens)
    with CoordinatorClient(address, token=token) as client:
        client.list_models()
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for ev in client.generate(model=model, prompt=PROMPT, params=params, timeout_s=600):
            now = time.perf_counter()
            if ev.token_ids and first is None:
                first = now
            n += len(ev.token_ids)
            last = now
    out.append({"t0": t0, "first": first, "last": last, "n": n})


def swarm_run(address: str, model: str, new_tokens: int, sessions: int, repeats: int, token: str | None = None) -> dict:
    """``sessions`` generations at once (a barrier starts them together), ``repeats`` times: the
    median run by aggregate throughput."""
    results = []
    for _ in range(repeats):
        out: list = []
        barrier = threading.Barrier(sessions) if sessions > 1 else None
        threads = [threading.Thread(target=one_generation, args=(address, model, new_tokens, out, barrier, token)) for _ in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        start = min(r["t0"] for r in out)
        end = max(r["last"] for r in out)
        ttft = statistics.mean(r["first"] - r["t0"] for r in out)
        # the mean time between a session's tokens (not the mean of rates: a session whose tokens
        # came in a burst, e.g. held for a spot check, would dominate that)
        gap = statistics.mean((r["last"] - r["first"]) / (r["n"] - 1) for r in out if r["n"] > 1)
        results.append({"ttft_s": ttft, "decode_tok_s": 1.0 / gap, "agg_tok_s": sum(r["n"] for r in out) / (end - start),
                        "ms_per_token": 1e3 * gap})
    # median run by aggregate throughput
    results.sort(key=lambda r: r["agg_tok_s"])
    return results[len(results) // 2]


class Swarm:
    """A coordinator and nodes as processes; optionally each node in its own network namespace."""

    def __init__(self, root: Path, num_nodes: int, *, device: str, netns: bool, rate_mbit: float, delay_ms: float,
                 pin_cores: bool = False) -> None:
        self.procs = []
        self.pin_cores = pin_cores
        self.netns: list[str] = []
        # a fixed token: a random one may start with '-', which argparse takes for a flag
        # generous liveness: on a shaped link, probes and steps can delay heartbeats
        coord_args = ["--token", BENCH_TOKEN, "--heartbeat-interval-s", "1.0",
                      "--node-timeout-s", "30", "--probe-bytes", str(64 << 10), "--log-level", "WARNING"]
        try:
            self._start(root, num_nodes, coord_args, device=device, netns=netns, rate_mbit=rate_mbit, delay_ms=delay_ms)
        except BaseException:
            self.close()  # no processes or namespaces left behind
            raise

    def _start(self, root: Path, num_nodes: int, coord_args: list[str], *, device: str, netns: bool,
               rate_mbit: float, delay_ms: float) -> None:
        host = "127.0.0.1"
        if netns:
            host = "10.77.0.1"
            self._setup_netns(num_nodes, rate_mbit, delay_ms)
        proc, ready = start_coordinator(root / "coord", host="0.0.0.0", extra_args=coord_args, prefix=self._pin(0))
        self.procs.append(proc)
        self.address = f"{host}:{ready['port']}"
        self.token = ready["admin_token"]  # serves models and generates; pins the coordinator's CA too
        for i in range(num_nodes):
            prefix = (["ip", "netns", "exec", self.netns[i]] if netns else []) + self._pin(i + 1)
            node_host = f"10.77.0.{i + 2}" if netns else "127.0.0.1"
            devices = device.split(",")  # a comma list: node i on the i-th device (cycling)
            p, _ = start_node(self.address, ready["token"], root / f"n{i}", device=devices[i % len(devices)], host=node_host,
                              prefix=prefix,
                              extra_args=["--probe-seconds", "0.2", "--log-level", "WARNING"],
                              env=child_env({"OMP_NUM_THREADS": os.environ.get("BENCH_NODE_THREADS", "1")}))
            self.procs.append(p)
        wait_until(lambda: len([n for n in CoordinatorClient(self.address, token=self.token).snapshot().nodes if n.state == "online"]) == num_nodes,
                   timeout_s=60, message="all nodes online")

    def _pin(self, index: int) -> list[str]:
        """--pin-cores: process ``index`` (0 = the coordinator) on a core of its own."""
        return ["taskset", "-c", str(index % (os.cpu_count() or 1))] if self.pin_cores else []

    def _setup_netns(self, n: int, rate_mbit: float, delay_ms: float) -> None:
        """A bridge in the root namespace at 10.77.0.1; node i in namespace swb<i> at 10.77.0.<i+2>;
        every veth shaped with tbf at rate_mbit both ways (so a hop crosses two shaped links)."""
        def sh(*cmd: str) -> None:
            subprocess.run(cmd, check=True, capture_output=True)
        sh("ip", "link", "add", "swbr0", "type", "bridge")
        sh("ip", "addr", "add", "10.77.0.1/24", "dev", "swbr0")
        sh("ip", "link", "set", "swbr0", "up")
        for i in range(n):
            ns = f"swb{i}"
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "link", "add", f"swv{i}", "type", "veth", "peer", "name", f"swp{i}")
            sh("ip", "link", "set", f"swp{i}", "netns", ns)
            sh("ip", "link", "set", f"swv{i}", "master", "swbr0")
            sh("ip", "link", "set", f"swv{i}", "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.77.0.{i + 2}/24", "dev", f"swp{i}")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"swp{i}", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            burst = max(int(rate_mbit * 1e6 / 8 / 250), 16000)
            for dev, pre in ((f"swv{i}", []), (f"swp{i}", ["ip", "netns", "exec", ns])):
                sh(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                   "burst", str(burst), "latency", "50ms")

    def wire_share(self) -> tuple[int, int]:
        """(steps the nodes answered over the step wire, steps they ran), from their metrics
        (sent with heartbeats: refreshed every few seconds)."""
        time.sleep(7)
        nodes = CoordinatorClient(self.address, token=self.token).snapshot().nodes
        return (sum(int(n.metrics.get("step_wire_steps", 0)) for n in nodes),
                sum(int(n.metrics.get("inference_steps", 0)) for n in nodes))

    def graph_use(self) -> str:
        """Each served stage's CUDA-graph decode use, from the nodes' metrics (after wire_share's wait)."""
        parts = []
        for n in CoordinatorClient(self.address, token=self.token).snapshot().nodes:
            for st in n.metrics.get("inference_stages", []) or []:
                if "graph_replays" in st:
                    parts.append(f"{st['model']} s{st['stage']}: {'on' if st['graphs_on'] else 'OFF'}, "
                                 f"{st['graph_captures']} captured, {st['graph_replays']} replayed")
        return "; ".join(sorted(parts))

    def keep_logs(self, directory: str) -> None:
        """--keep-logs: the coordinator's and nodes' logs copied to ``directory``."""
        import shutil

        Path(directory).mkdir(parents=True, exist_ok=True)
        for p in getattr(self, "procs", []):
            if p.log_path.exists():
                shutil.copy(p.log_path, Path(directory) / p.log_path.name)

    def close(self) -> None:
        for p in reversed(getattr(self, "procs", [])):
            p.stop()
        for i, ns in enumerate(self.netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"swv{i}"], capture_output=True)
        if self.netns:
            subprocess.run(["ip", "link", "del", "swbr0"], capture_output=True)


def _progress(out, key: tuple[str, int, int], r: dict) -> None:
    """Each measurement as it is made, so a run stopped at a time limit still leaves its figures."""
    print(f"measured: {key[0]}, {key[1]} stage(s), {key[2]} session(s): {r['ms_per_token']:.2f} ms/token, "
          f"{r['agg_tok_s']:.1f} tok/s aggregate, TTFT {r['ttft_s'] * 1e3:.1f} ms", file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1,2,4")
    ap.add_argument("--sessions", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--family", default="gpt2", choices=("gpt2", "llama"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:K; a comma list spreads the nodes (node i on the i-th)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seq-len", type=int, default=128, help="served context per session (KV cache length)")
    ap.add_argument("--netns", action="store_true", help="nodes in network namespaces with tc tbf shaped links")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--hidden-codec", default="none", choices=("none", "int8", "auto"))
    ap.add_argument("--verify-prob", type=float, default=None,
                    help="spot-check probability the model is served with (default: the coordinator's, as users "
                         "run it; 0: off, the data plane alone)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--record-to", default=None, help="append the section to this file instead of docs/benchmarks.md")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--json", action="store_true", help="print one JSON object (baseline and runs) on stdout")
    ap.add_argument("--quick", action="store_true", help="CPU loopback, 1 and 2 stages, 1 and 8 sessions, < 3 minutes")
    ap.add_argument("--baseline-threads", type=int, default=0,
                    help="torch threads of generate (default: BENCH_NODE_THREADS, one node process's: the stages of "
                         "a chain compute one after the other)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--pin-cores", action="store_true",
                    help="run the coordinator and each node process on a CPU core of its own (taskset)")
    ap.add_argument("--step-transport", choices=("wire", "grpc"), default="wire",
                    help="how steps go between the coordinator and stages: the step wire (TLS sockets, the "
                         "default) or gRPC streams (SWARM_STEP_WIRE=0), for a before/after in one session")
    ap.add_argument("--trace", action="store_true",
                    help="time every hop of every decode step (SWARM_STEP_TRACE) and print where a token's time goes")
    ap.add_argument("--keep-logs", default=None, metavar="DIR",
                    help="copy the coordinator's and nodes' logs to DIR before they are deleted")
    ap.add_argument("--trace-dir", default=None, help="keep the --trace files here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.quick:
        args.stages, args.sessions, args.new_tokens, args.repeats = "1,2", "1,8", 32, 3
    node_threads = int(os.environ.get("BENCH_NODE_THREADS", "1"))
    args.baseline_threads = args.baseline_threads or node_threads
    out = sys.stderr if args.json else sys.stdout  # --json: stdout carries only the JSON object
    stages = [int(s) for s in args.stages.split(",")]
    sessions = [int(s) for s in args.sessions.split(",")]
    dtype = getattr(torch, args.dtype)
    local_device = args.device.split(",")[0]  # --device cuda:0,cuda:1: nodes spread, baselines on the first

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        ckpt = root / "ckpt"
        cfg = make_tiny_checkpoint(ckpt, args.family, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                                   max_position_embeddings=512)
        from tokenizers import Tokenizer

        prompt_ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(PROMPT).ids
        params_m = cfg.num_parameters() / 1e6
        if args.trace:
            trace_dir = Path(args.trace_dir) if args.trace_dir else root / "trace"
            os.environ["SWARM_STEP_TRACE"] = str(trace_dir)  # the swarm's processes inherit it
        os.environ["SWARM_STEP_WIRE"] = "1" if args.step_transport == "wire" else "0"  # inherited too
        best: dict[tuple[str, int, int], dict] = {}

        def keep(key: tuple[str, int, int], r: dict) -> None:
            _progress(out, key, r)
            if key not in best or r["agg_tok_s"] > best[key]["agg_tok_s"]:
                best[key] = r

        def single_process_runs(s: int) -> None:
            """The baseline and the single-process runtime, each kept at its best."""
            if not args.no_baseline:
                from bench.baselines import hf_generate

                r = hf_generate(ckpt, prompt_ids, new_tokens=args.new_tokens, batch=s, device=local_device,
                                dtype=dtype, threads=args.baseline_threads)
                keep(("HF generate (baseline)", 1, s), {"ttft_s": r["ttft_s"], "decode_tok_s": 1e3 / r["ms_per_token"],
                                                        "agg_tok_s": r["tokens_per_s"], "ms_per_token": r["ms_per_token"]})
            keep(("single process", 1, s),
                 local_run(ckpt, args.layers, prompt_ids, args.new_tokens, s, local_device, dtype, args.max_seq_len))

        # once before the swarm's processes exist, then interleaved with the swarm's runs; the
        # best run counts, so the baselines are never measured only beside the swarm's processes
        for s in sessions:
            single_process_runs(s)
        swarm = Swarm(root, max(stages), device=args.device, netns=args.netns, rate_mbit=args.rate_mbit, delay_ms=args.delay_ms,
                      pin_cores=args.pin_cores)
        try:
            for k in stages:
                with CoordinatorClient(swarm.address, token=swarm.token) as client:
                    client.upload_model(ckpt, name=f"bench-{k}", options=ServeOptions(
                        num_replicas=1, num_stages=k, max_seq_len=args.max_seq_len, sessions_per_replica=max(sessions),
                        hidden_codec=args.hidden_codec, dtype=args.dtype, verify_prob=args.verify_prob))
                one_generation(swarm.address, f"bench-{k}", 4, [], None, swarm.token)  # warm-up
            # interleave configurations so they share the same machine conditions; keep each
            # configuration's best run (highest aggregate throughput): the least disturbed one
            for _ in range(args.repeats):
                for s in sessions:
                    single_process_runs(s)
                    for k in stages:
                        r = swarm_run(swarm.address, f"bench-{k}", args.new_tokens, s, 1, token=swarm.token)
                        where = f"{k}-stage swarm ({'tbf ' + str(args.rate_mbit) + ' Mbit/s netns' if args.netns else 'loopback'})"
                        keep((where, k, s), r)
                print(f"round done: {len(best)} configurations", file=out, flush=True)
            wire_steps = swarm.wire_share()
            graph_use = swarm.graph_use()
        finally:
            if args.keep_logs:
                swarm.keep_logs(args.keep_logs)
            swarm.close()
        trace_notes = trace_table(trace_dir, stages, sessions) if args.trace else ""
        order = {"HF generate (baseline)": 0, "single process": 1}
        base = {s: r["agg_tok_s"] for (where, _, s), r in best.items() if where == "HF generate (baseline)"}
        runs = []
        for (where, k, s), r in sorted(best.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0][1], kv[0][2])):
            ratio = r["agg_tok_s"] / base[s] if s in base else None
            rows.append([where, k, s, r["ttft_s"] * 1e3, r["ms_per_token"], r["decode_tok_s"], r["agg_tok_s"],
                         f"{ratio:.2f}x" if ratio is not None else "-"])
            if where not in order:
                runs.append({"stages": k, "sessions": s, "tokens_per_s": r["agg_tok_s"], "ms_per_token": r["ms_per_token"],
                             "ttft_ms": r["ttft_s"] * 1e3, "ratio_to_baseline": ratio,
                             "baseline_tokens_per_s": base.get(s)})
            elif where == "single process":
                runs.append({"stages": 0, "sessions": s, "setup": "single-process StageRuntime",
                             "tokens_per_s": r["agg_tok_s"], "ms_per_token": r["ms_per_token"],
                             "ttft_ms": r["ttft_s"] * 1e3, "ratio_to_baseline": ratio,
                             "baseline_tokens_per_s": base.get(s)})
    headers = ["setup", "stages", "sessions", "TTFT ms", "ms/token (per session)", "tok/s per session", "aggregate tok/s",
               "vs generate"]
    table = markdown_table(headers, rows)
    print(table, file=out)
    # derived targets
    notes = [f"Model: tiny {args.family}, {args.layers} layers, hidden {args.hidden}, {params_m:.1f}M parameters, "
             f"{args.dtype} on {args.device}; prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, greedy, "
             f"KV cache {args.max_seq_len} positions per session; "
             f"best of {args.repeats} interleaved runs; hidden codec {args.hidden_codec}; one node process per stage"
             + ("; nodes in network namespaces behind tc tbf" if args.netns else "; loopback")
             + ("; coordinator and nodes each pinned to one core (--pin-cores)" if args.pin_cores else "") + "; "
             + f"node processes {node_threads} torch thread(s) each; baseline `generate` "
             + f"{args.baseline_threads} thread(s) (a chain's stages compute one after the other); spot checks "
             + (f"at p = {args.verify_prob:g}" if args.verify_prob is not None else "at the coordinator's default")
             + " (held tokens reach a session in bursts: its ms/token is the mean time between its tokens)."]
    by = {(r[0].split(" ")[0] in ("single", "HF"), r[1], r[2]): r for r in rows if not r[0].startswith("HF")}
    one = by.get((False, 1, 1))
    for k in stages:
        row = by.get((False, k, 1))
        if k > 1 and row and one:
            notes.append(f"- per-token overhead per extra stage ({k} stages vs 1): {(row[4] - one[4]) / (k - 1):.2f} ms")
    for k in stages:
        a, b = by.get((False, k, 1)), by.get((False, k, 8))
        if a and b:
            notes.append(f"- {k} stage(s): 8 concurrent sessions give {b[6] / a[6]:.2f}x the aggregate throughput of one")
    notes.append(f"- steps between processes: --step-transport {args.step_transport}; the nodes answered "
                 f"{wire_steps[0]} of their {wire_steps[1]} steps over the step wire")
    if graph_use:
        notes.append(f"- CUDA-graph decode per stage (swarm/inference/graphs.py): {graph_use}")
    if trace_notes:
        notes.append(trace_notes)
    print("\n".join(notes), file=out)
    if args.json:
        first = sessions[0]
        print(json.dumps({"baseline_tokens_per_s": base.get(first), "baseline_sessions": first,
                          "baselines_by_sessions": {str(k): v for k, v in base.items()},
                          "baseline_threads": args.baseline_threads, "device": args.device, "runs": runs}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"headers": headers, "rows": rows, "notes": notes}, indent=2))
    if not args.no_record:
        title = (f"Inference: pipeline chains ({args.device}{', netns tbf' if args.netns else ', loopback'}, "
                 f"steps over {'the step wire' if args.step_transport == 'wire' else 'gRPC streams'})")
        record(title, table, "\n".join(notes), doc=Path(args.record_to) if args.record_to else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
