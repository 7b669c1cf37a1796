"""What TLS costs the training pipeline: ``python -m bench.pipeline --tls-cost`` (this module holds
its implementation; its flags are bench/pipeline.py's, the swarm it drives bench/pipeline_swarm.py's).

Each configuration runs with TLS (every gRPC channel, as users run it) and with the
benchmark-only plaintext transport (``SWARM_BENCH_PLAINTEXT=1``: swarm/transport/tls.py
``PlaintextSecurity``), same jobs. Besides tokens/s of the warm steps it reads the CPU time of
every process of the swarm over each job: on a machine shared with other work wall time is
noisy, CPU per job much less so, and where the swarm's CPU is the bottleneck the ratio of CPU
per job is the ratio of tokens/s to expect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench._record import markdown_table, record
from bench.pipeline_swarm import Swarm, measure, prepare_inputs, run_job


def cpu_seconds(swarm: Swarm) -> float:
    """User + system CPU seconds used so far by every process of ``swarm`` (each child runs in a
    process group of its own: its threads and any processes it started are counted)."""
    groups = {h.proc.pid for h in swarm.procs}
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) in groups:  # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / tick


def tls_cost(args, root: Path, codecs: list[str], rates: list[float]) -> int:
    """TLS against the benchmark-only plaintext mode, same jobs: loopback, then each rate if given
    (tc tbf in netns, or ``--emulate``: shaped in the senders, one swarm per rate). One swarm per
    mode at a time (the mode is a process setting), rounds alternating which mode goes first; or,
    with ``--paired``, both at once. Each (mode, setting, codec) keeps its best run over
    ``--repeats`` rounds; every round and the ratio within each round are printed too."""
    cfg = prepare_inputs(args, root)
    netns = bool(rates) and not args.emulate
    settings = [None] + rates

    def name_of(rate):
        if rate:
            return f"{'emulated' if args.emulate else 'tbf'} {rate:g} Mbit/s"
        return "unshaped veth" if netns else "loopback"

    if args.paired:
        if netns:
            raise SystemExit("--paired runs both swarms at once on loopback: use it with --no-netns or --emulate")
        runs = _paired_runs(args, root, codecs, settings, name_of)
    else:
        runs = _sequential_runs(args, root, codecs, settings, rates, netns, name_of)
    rows = []
    for rate in settings:
        for codec in codecs:
            t_runs, p_runs = runs[("tls", rate or 0.0, codec)], runs[("plaintext", rate or 0.0, codec)]
            t = max(t_runs, key=lambda m: m["tokens_per_s"])
            p = max(p_runs, key=lambda m: m["tokens_per_s"])
            spread = " / ".join(f"{int(round(m['tokens_per_s']))}" for m in t_runs) + " vs " + \
                " / ".join(f"{int(round(m['tokens_per_s']))}" for m in p_runs)
            # CPU per job (every process of the swarm, whole job): the least of the rounds, which
            # other load on the machine disturbs far less than wall time
            ct, cp = min(m["cpu_s"] for m in t_runs), min(m["cpu_s"] for m in p_runs)
            # the ratio within each round (the two modes' runs of round r), and their median
            per_round = sorted(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(t_runs, p_runs) if b["tokens_per_s"])
            median = per_round[len(per_round) // 2] if len(per_round) % 2 else \
                sum(per_round[len(per_round) // 2 - 1:len(per_round) // 2 + 1]) / 2
            rows.append([name_of(rate), codec, int(round(t["tokens_per_s"])), int(round(p["tokens_per_s"])),
                         f"{t['tokens_per_s'] / p['tokens_per_s']:.3f}" if p["tokens_per_s"] else "-",
                         f"{median:.3f} ({', '.join(f'{r:.2f}' for r in per_round)})",
                         f"{100 * t['wait_frac']:.0f}% / {100 * p['wait_frac']:.0f}%", spread,
                         f"{ct:.1f} / {cp:.1f}", f"{cp / ct:.3f}" if ct else "-"])
    headers = ["link", "codec", "tokens/s TLS", "tokens/s plaintext", "TLS / plaintext",
               "TLS / plaintext within a round: median (each)", "network wait TLS / plain",
               "every round TLS vs plaintext", "CPU s per job TLS / plain", "plain / TLS CPU"]
    table = markdown_table(headers, rows)
    print(table)
    notes = (f"Model: tiny GPT-2, {args.layers} layers, hidden {args.hidden}, {cfg.num_parameters() / 1e6:.2f}M parameters, "
             f"float32 on {args.device}; {args.stages} stages (one node process each, {args.threads} torch thread(s)), "
             f"1F1B, batch {args.batch_size} x {args.seq_len} tokens in micro-batches of {args.micro_batch_size}; "
             f"{args.steps} steps, best of {args.repeats} round(s) per cell "
             + ("(--paired: the TLS and the plaintext swarm ran each job at the same time, side by side), "
                if args.paired else "(rounds alternate which mode runs first), ") +
             "warm steps only. TLS: every gRPC channel "
             "(coordinator and peer-to-peer, mTLS with ECDSA P-256 certificates, TLS 1.3); plaintext: the "
             "benchmark-only SWARM_BENCH_PLAINTEXT=1 mode, same processes and jobs otherwise. CPU s per job: user + "
             "system time of the coordinator and node processes over the whole job (least of the rounds); "
             "plain / TLS CPU is the tokens/s ratio to expect where the swarm's CPU is the bottleneck.")
    print(notes)
    if not args.no_record:
        if netns:
            how = "netns veth unshaped" + "".join(f" and tc tbf {r:g} Mbit/s" for r in rates)
        else:
            how = "loopback" + "".join(f" and emulated {r:g} Mbit/s" for r in rates) + (", paired" if args.paired else "")
        record(f"TLS cost of the training pipeline ({args.device}, {how})", table, notes,
               doc=Path(args.record_to) if args.record_to else None)
    return 0


def _run_one(swarm: Swarm, root: Path, codec: str, args) -> dict:
    cpu0 = cpu_seconds(swarm)
    job = run_job(swarm, root / "model", root / "data.txt", codec=codec, args=args)
    m = measure(swarm, job, warm_epochs=args.warm_epochs)
    m.update(cpu_s=cpu_seconds(swarm) - cpu0)
    return m


def _sequential_runs(args, root: Path, codecs, settings, rates, netns: bool, name_of) -> dict[tuple, list[dict]]:
    """One swarm at a time, the modes taking turns (rounds alternate which goes first)."""
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        modes = ("tls", "plaintext") if rep % 2 == 0 else ("plaintext", "tls")
        for mode in modes:
            # netns: one swarm re-shaped between jobs; loopback / --emulate: one swarm per rate
            groups = [settings] if netns or not args.emulate else [[r] for r in settings]
            for group in groups:
                swarm = Swarm(root / f"swarm-{mode}-{rep}-{group[0] or 0:g}", args.stages, device=args.device,
                              rate_mbit=rates[0] if netns else None, threads=args.threads,
                              emulate_mbit=group[0] if args.emulate else None, plaintext=mode == "plaintext")
                try:
                    for rate in group:
                        if netns:
                            swarm.set_rate(rate)
                        for codec in codecs:
                            m = _run_one(swarm, root, codec, args)
                            m.update(setting=name_of(rate), codec=codec, mode=mode, round=rep)
                            print(json.dumps(m), flush=True)
                            runs.setdefault((mode, rate or 0.0, codec), []).append(m)
                finally:
                    swarm.close()
    return runs


def _paired_runs(args, root: Path, codecs, settings, name_of) -> dict[tuple, list[dict]]:
    """A TLS swarm and a plaintext swarm side by side (loopback, rates emulated in the senders),
    each job submitted to both at the same moment: both see the same load from the rest of the
    machine, which on a shared machine moves each round's tokens/s far more than TLS does. They
    also compete with each other, symmetrically."""
    from concurrent.futures import ThreadPoolExecutor

    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        for rate in settings:
            swarms = {mode: Swarm(root / f"swarm-{mode}-{rep}-{rate or 0:g}", args.stages, device=args.device,
                                  rate_mbit=None, threads=args.threads, emulate_mbit=rate,
                                  plaintext=mode == "plaintext") for mode in ("tls", "plaintext")}
            try:
                for codec in codecs:
                    with ThreadPoolExecutor(max_workers=2) as pool:
                        futures = {mode: pool.submit(_run_one, sw, root, codec, args) for mode, sw in swarms.items()}
                        for mode, fut in futures.items():
                            m = fut.result()
                            m.update(setting=name_of(rate), codec=codec, mode=mode, round=rep)
                            print(json.dumps(m), flush=True)
                            runs.setdefault((mode, rate or 0.0, codec), []).append(m)
            finally:
                for sw in swarms.values():
                    sw.close()
    return runs
