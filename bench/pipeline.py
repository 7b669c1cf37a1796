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
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record
from bench.pipeline_swarm import Swarm, measure, prepare_inputs, run_job


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
