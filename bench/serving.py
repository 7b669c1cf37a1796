"""Serving a request stream on heterogeneous nodes: fixed replicas vs per-request routes, and
colocated vs disaggregated prefill/decode (issue 17).

    python -m bench.serving [--clients 8] [--requests 48] [--repeats 3] [--slow-threads 1] [--fast-threads 3]
    python -m bench.serving --slowdown 3 --fast-threads 1    # a 2-core machine
    python -m bench.serving --arms disagg --quick            # disaggregation only, a short run

A coordinator and 4 node processes on this machine; node n0 is slowed: ``OMP_NUM_THREADS`` =
--slow-threads, the others --fast-threads (needs spare cores), or with --slowdown F every
step it serves takes F times its compute time (``SWARM_FAULT=slowdown=F``, an emulated slower
device, for machines with too few cores to slow a node by its threads). One tiny llama checkpoint is served twice on the
same 4 nodes as 2 replicas x 2 stages, no spot checks: ``fixed`` (each session on one whole
replica, the least loaded) and ``routes`` (``--routes``: each session on the route predicted
fastest, coordinator/inference/routes.py). Runs alternate ``--repeats`` times; each run serves
--requests requests of one seeded mix (prompts of 8-64 words, 16-64 new tokens, greedy): with
``--load 0`` closed loop, --clients threads back to back; by default open loop: a seeded Poisson
stream at --load (0.5) of the fixed model's closed-loop capacity measured just before (or --rate
requests/s), as users send them whatever the swarm's speed; each arm then gets the same requests
at the same times, and a slow chain's tokens count as often as the requests routed through it.
Measured at the client: aggregate tokens/s (all tokens / wall time), time to first token (p50,
from the request's arrival), time between tokens (p50, p99 and mean over every token; an event's
tokens share its gap), and each request's own mean time between tokens (p50 and p90 over
requests: what one user sees; closed-loop clients send fewer requests through a slow chain, so
the per-token figures lean on the fast ones). During routes runs the coordinator's route view is
sampled every 0.1 s: the slowed node's session count against its peer's at the same stage (time
average). The report adds the TBT p50 gain of each alternating pair.

Disaggregation arm (``--arms disagg`` or ``all``): the same checkpoint served a third time with
``--disaggregate`` (a prefill chain and a decode chain on the same 4 nodes) against the
``fixed`` (colocated) model, on a prefill-heavy mix (prompts of 40-70 words, ~3 tokens each;
4-12 new tokens), same metrics, plus the coordinator's predicted gain and its reason and the KV
bytes it moved. Prints the tables, appends them to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record
from swarm.inference.sampling import SamplingParams
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until
from swarm.model.testing import make_tiny_checkpoint
from swarm.transport.coordinator_client import CoordinatorClient, ServeOptions

COORDINATOR_ARGS = ["--heartbeat-interval-s", "1.0", "--node-timeout-s", "30", "--log-level", "WARNING"]
NODE_ARGS = ["--probe-seconds", "0.2", "--log-level", "WARNING"]
WORDS = "the swarm pools volunteer cards over ordinary links to train and serve models for everyone".split()


def request_mix(n: int, seed: int, *, words: tuple[int, int] = (8, 64), new: tuple[int, int] = (16, 64)
                ) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))), rng.randint(*new)) for _ in range(n)]


PREFILL_HEAVY = {"words": (40, 70), "new": (4, 12)}  # ~3 tokens a word: fits the tiny 256-token context


def run_stream(address: str, token: str, model: str, mix: list[tuple[str, int]], clients: int,
               rate: float = 0.0, seed: int = 0) -> dict:
    """Serve ``mix`` and measure it at the client.

    ``rate`` 0: closed loop, ``clients`` threads each issue the next request when their last one ends.
    ``rate`` > 0: open loop, requests arrive as a seeded Poisson stream of ``rate`` requests/s, whatever
    the swarm's speed (as users do), on up to ``clients`` connections at once; a request that finds
    them all busy waits, and that wait counts in its time to first token (timed from its arrival).
    """
    lock = threading.Lock()
    ttft, tbt, tokens, errors, per_request = [], [], [0], [], []

    def serve(c: CoordinatorClient, prompt: str, n: int, t0: float) -> None:
        last, first, gaps, first_at = t0, True, 0, t0
        for ev in c.generate(model=model, prompt=prompt, params=SamplingParams(max_new_tokens=n), timeout_s=600):
            if not ev.token_ids:
                continue
            now = time.perf_counter()
            with lock:
                if first:
                    ttft.append(now - t0)
                    first_at = now
                else:
                    tbt.extend([(now - last) / len(ev.token_ids)] * len(ev.token_ids))
                    gaps += len(ev.token_ids)
                tokens[0] += len(ev.token_ids)
            first, last = False, now
        if gaps:  # the request's mean time between tokens (its decode time / its later tokens)
            with lock:
                per_request.append((last - first_at) / gaps)

    conns = [CoordinatorClient(address, token=token) for _ in range(clients)]
    try:
        for c in conns:  # connect (CA fetch, TLS handshake) before the clock starts
            c.list_models()
        start = time.perf_counter()
        threads = []
        if rate <= 0:
            todo = list(mix)

            def loop(c: CoordinatorClient) -> None:
                try:
                    while True:
                        with lock:
                            if not todo:
                                return
                            prompt, n = todo.pop(0)
                        serve(c, prompt, n, time.perf_counter())
                except Exception as exc:  # noqa: BLE001 -- reported after the run: a failed request voids it
                    errors.append(exc)
            threads = [threading.Thread(target=loop, args=(c,)) for c in conns]
            for t in threads:
                t.start()
        else:
            free: queue.Queue = queue.Queue()
            for c in conns:
                free.put(c)
            rng, at = random.Random(seed), start

            def one(prompt: str, n: int, arrived: float) -> None:
                c = free.get()
                try:
                    serve(c, prompt, n, arrived)
                except Exception as exc:  # noqa: BLE001 -- reported after the run
                    errors.append(exc)
                finally:
                    free.put(c)
            for prompt, n in mix:
                at += rng.expovariate(rate)
                time.sleep(max(0.0, at - time.perf_counter()))
                t = threading.Thread(target=one, args=(prompt, n, at))
                t.start()
                threads.append(t)
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) of {model} failed: {errors[0]}")
    tbt.sort()
    per_request.sort()
    return {"tok_s": tokens[0] / wall, "ttft_p50_s": statistics.median(ttft), "tbt_p50_s": tbt[len(tbt) // 2],
            "tbt_p99_s": tbt[min(len(tbt) - 1, int(len(tbt) * 0.99))], "tbt_mean_s": statistics.mean(tbt),
            "request_tbt_p50_s": statistics.median(per_request),
            "request_tbt_p90_s": per_request[min(len(per_request) - 1, int(len(per_request) * 0.9))]}


def sample_routes(address: str, token: str, slow: str, stop: threading.Event, out: list) -> None:
    """(slowed node's sessions, its stage peer's sessions) every 0.1 s, while routes run."""
    with CoordinatorClient(address, token=token) as c:
        while not stop.wait(0.1):
            m = next((m for m in c.list_models() if m.name == "routes"), None)
            if m is None or not m.replicas:
                continue
            stage = next((k for r in m.replicas for k, s in enumerate(r.stages) if s.node_id == slow), None)
            if stage is None:
                continue
            peer = next(r.stages[stage].node_id for r in m.replicas if r.stages[stage].node_id != slow)
            load = {slow: 0, peer: 0}
            for r in m.routes:
                if r.node_ids and r.node_ids[stage] in load:
                    load[r.node_ids[stage]] += r.sessions
            if load[slow] or load[peer]:
                out.append((load[slow], load[peer]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--slow-threads", type=int, default=1)
    p.add_argument("--fast-threads", type=int, default=3)
    p.add_argument("--slowdown", type=float, default=1.0, help="n0's steps take this many times their compute (SWARM_FAULT)")
    p.add_argument("--arms", choices=("routes", "disagg", "all"), default="all",
                   help="routes: fixed vs per-request routes; disagg: colocated vs disaggregated (default all)")
    p.add_argument("--load", type=float, default=0.5,
                   help="routes arm: requests arrive open loop (Poisson) at this fraction of the fixed model's "
                        "measured closed-loop capacity (default 0.5); 0: closed loop, --clients back to back")
    p.add_argument("--rate", type=float, default=0.0, help="routes arm: arrivals per second (overrides --load)")
    p.add_argument("--quick", action="store_true", help="a short run: 4 clients, 12 requests, 1 repeat, 4 layers")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.repeats, args.layers = 4, 12, 1, 4
    arms = ("routes", "disagg") if args.arms == "all" else (args.arms,)
    procs, runs, shares = [], {"fixed": [], "routes": [], "colocated": [], "disagg": []}, []
    mix = request_mix(args.requests, seed=7)
    heavy = request_mix(args.requests, seed=8, **PREFILL_HEAVY)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        try:
            coord, ready = start_coordinator(root / "coord", extra_args=COORDINATOR_ARGS)
            procs.append(coord)
            address = f"127.0.0.1:{ready['port']}"
            ids = []
            for i in range(4):
                threads = args.slow_threads if i == 0 else args.fast_threads
                env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                if i == 0 and args.slowdown > 1:
                    env["SWARM_FAULT"] = f"slowdown={args.slowdown}"
                proc, f = start_node(address, ready["token"], root / f"n{i}", name=f"n{i}", extra_args=NODE_ARGS,
                                     env=child_env(env))
                procs.append(proc)
                ids.append(f["node_id"])
            ckpt = root / "ckpt"
            make_tiny_checkpoint(ckpt, "llama", num_layers=args.layers, hidden_size=args.hidden, num_heads=8, seed=1)
            with CoordinatorClient(address, token=ready["admin_token"]) as client:
                wait_until(lambda: sum(n.state == "online" for n in client.snapshot().nodes) == 4, 60)
                for name in ("fixed",) + tuple(a for a in arms):
                    client.upload_model(ckpt, name=name, options=ServeOptions(
                        num_replicas=2, num_stages=2, max_seq_len=512, sessions_per_replica=args.clients,
                        verify_prob=0.0, routes=name == "routes", disaggregate="on" if name == "disagg" else "off"))
                placed = {m.name: [[s.node_id[:8] for s in r.stages] for r in m.replicas] for m in client.list_models()}
            if "disagg" in arms:
                runs_disagg(address, ready, heavy, args, runs)
            rate = args.rate
            if "routes" in arms:
                run_stream(address, ready["read_token"], "routes", mix[:args.clients], args.clients)  # warm the live map
                if rate <= 0 < args.load:  # calibrate: the fixed model's closed-loop capacity on this machine
                    t0 = time.perf_counter()
                    run_stream(address, ready["read_token"], "fixed", mix[:2 * args.clients], args.clients)
                    rate = args.load * 2 * args.clients / (time.perf_counter() - t0)
                    print(f"open loop: {rate:.2f} requests/s ({args.load:g} of the fixed model's closed-loop capacity)")
            for _ in range(args.repeats if "routes" in arms else 0):
                for name in ("fixed", "routes"):
                    stop, seen = threading.Event(), []
                    sampler = threading.Thread(target=sample_routes, args=(address, ready["read_token"], ids[0], stop, seen))
                    if name == "routes":
                        sampler.start()
                    runs[name].append(run_stream(address, ready["read_token"], name, mix, args.clients, rate=rate,
                                                 seed=len(runs[name])))
                    stop.set()
                    if name == "routes":
                        sampler.join()
                        shares.extend(seen)
            with CoordinatorClient(address, token=ready["admin_token"]) as client:
                disagg = next((m.disaggregation for m in client.list_models() if m.name == "disagg"), None)
        finally:
            for proc in reversed(procs):
                proc.stop()
    if "disagg" in arms:
        report_disagg(runs, disagg, args, placed)
    if "routes" not in arms:
        return 0

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])
    rows = [[name, med(name, "tok_s"), med(name, "ttft_p50_s") * 1e3, med(name, "tbt_p50_s") * 1e3,
             med(name, "tbt_p99_s") * 1e3, med(name, "tbt_mean_s") * 1e3, med(name, "request_tbt_p50_s") * 1e3,
             med(name, "request_tbt_p90_s") * 1e3] for name in ("fixed", "routes")]
    rows[1].append(rows[0][3] / rows[1][3])
    rows[0].append(1.0)
    table = markdown_table(["mode", "tokens/s", "TTFT p50 (ms)", "TBT p50 (ms)", "TBT p99 (ms)", "TBT mean (ms)",
                            "request TBT p50 (ms)", "request TBT p90 (ms)", "TBT p50 gain"], rows)
    slow_avg = statistics.mean(s for s, _ in shares) if shares else float("nan")
    peer_avg = statistics.mean(q for _, q in shares) if shares else float("nan")
    slowed = f"{args.slow_threads} thread(s)" + (f", slowdown x{args.slowdown:g}" if args.slowdown > 1 else "")
    share = (f"routes: the slowed node (n0, {slowed}) held {slow_avg:.2f} sessions on average, its "
             f"stage peer ({args.fast_threads} threads) {peer_avg:.2f} ({len(shares)} samples)")
    stream = (f"open loop: Poisson arrivals at {rate:.2f} requests/s on up to {args.clients} connections"
              + (f" ({args.load:g} of the fixed model's measured closed-loop capacity)" if args.rate <= 0 else "")
              if rate > 0 else f"closed loop: {args.clients} clients back to back")
    pairs = ", ".join(f"{f['tbt_p50_s'] / r['tbt_p50_s']:.2f}" for f, r in zip(runs["fixed"], runs["routes"]))
    share += f"; TBT p50 gain (fixed / routes) in each alternating pair: {pairs}"
    print(table)
    print(stream)
    print(share)
    print(json.dumps({"runs": runs, "placed": placed}))
    if not args.no_record:
        record("Serving: fixed replicas vs per-request routes, one node slowed (bench/serving.py)", table,
               notes=(f"tiny llama {args.layers} layers, hidden {args.hidden}; 2 replicas x 2 stages on 4 node "
                      f"processes of this machine, n0 with {slowed}, the others "
                      f"{args.fast_threads}; {stream}, {args.requests} requests per run (prompts 8-64 "
                      f"words, 16-64 new tokens, greedy); median of {args.repeats} alternating runs. {share}. "
                      f"Placement: {placed}. All runs: {json.dumps(runs)}"))
    return 0


def runs_disagg(address: str, ready: dict, heavy: list, args, runs: dict) -> None:
    """Alternate colocated (the ``fixed`` model) and disaggregated runs of the prefill-heavy mix."""
    run_stream(address, ready["read_token"], "disagg", heavy[:args.clients], args.clients)  # warm up
    for _ in range(args.repeats):
        runs["colocated"].append(run_stream(address, ready["read_token"], "fixed", heavy, args.clients))
        runs["disagg"].append(run_stream(address, ready["read_token"], "disagg", heavy, args.clients))


def report_disagg(runs: dict, disagg, args, placed: dict) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])
    rows = [[name, med(name, "tok_s"), med(name, "ttft_p50_s") * 1e3, med(name, "tbt_p50_s") * 1e3,
             med(name, "tbt_p99_s") * 1e3] for name in ("colocated", "disagg")]
    rows[0].append(1.0)
    rows[1].append(rows[1][1] / rows[0][1])
    table = markdown_table(["mode", "tokens/s", "TTFT p50 (ms)", "TBT p50 (ms)", "TBT p99 (ms)", "throughput gain"],
                           rows)
    gain = rows[1][1] / rows[0][1]
    verdict = (f"measured {gain:.2f}x throughput: " + ("a gain" if gain > 1.05 else "no gain" if gain < 0.95 else
                                                       "no difference beyond noise"))
    pred = (f"coordinator predicted {disagg.predicted_gain:.2f}x throughput, {disagg.predicted_tbt_p99_ratio:.2f}x "
            f"TBT p99: {disagg.reason}; {disagg.num_handoffs} KV hand-offs moved {disagg.kv_bytes_moved} bytes, "
            f"{disagg.num_handoff_failures} failed") if disagg is not None else "no prediction (model missing)"
    shared = (f"The {os.cpu_count()} cores of this machine are shared by all 4 node processes: a prefill on the "
              "prefill chain takes CPU from the decode chain's steps too, so the separation disaggregation buys on "
              "separate devices is not there to measure. " if (os.cpu_count() or 1) < 8 else "")
    print(table)
    print(verdict)
    print(shared)
    print(pred)
    print(json.dumps({"colocated": runs["colocated"], "disagg": runs["disagg"]}))
    if not args.no_record:
        record("Serving: disaggregated prefill/decode vs colocated, prefill-heavy mix (bench/serving.py)", table,
               notes=(f"tiny llama {args.layers} layers, hidden {args.hidden}; the same 4 node processes of this "
                      f"machine serve `fixed` (colocated: 2 replicas x 2 stages) and `disagg` (`--disaggregate`: "
                      f"a prefill chain + a decode chain); {args.clients} clients, {args.requests} requests per run "
                      f"(prompts 40-70 words, ~3 tokens each, 4-12 new tokens, greedy); median of {args.repeats} "
                      f"alternating runs. {verdict}. {pred}. {shared}Placement: {placed}. "
                      f"All runs: {json.dumps({k: runs[k] for k in ('colocated', 'disagg')})}"))


if __name__ == "__main__":
    sys.exit(main())
