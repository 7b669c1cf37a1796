"""What inference spot checks cost (issue 13): tokens/s with ``--verify-prob`` at the default vs off.

    python -m bench.inference_checks [--sessions 4] [--new-tokens 48] [--repeats 3] [--no-record]

A coordinator and 4 node processes on this machine serve a tiny llama checkpoint as 2 replicas x
2 stages (``--replicas 1``: one chain, whose checked windows replay on the coordinator's referee),
twice under two names: ``off`` (``--verify-prob 0``) and ``checked`` (the default,
``DEFAULT_VERIFY_PROB``). Both are on the same nodes, so the two runs differ only in checking.
Runs alternate ``--repeats`` times; each run generates ``--sessions`` concurrent greedy sessions
of ``--new-tokens`` tokens. Reported: aggregate tokens/s (median run), the checked / off ratio,
and the checks the coordinator counted. Prints a table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench._cpu import tree_cpu_s
from bench._record import markdown_table, record
from bench.inference import swarm_run
from coordinator.inference.store import DEFAULT_VERIFY_PROB
from swarm.localswarm import start_coordinator, start_node, wait_until
from swarm.model.testing import make_tiny_checkpoint
from swarm.transport.coordinator_client import CoordinatorClient, ServeOptions

COORDINATOR_ARGS = ["--heartbeat-interval-s", "1.0", "--node-timeout-s", "30", "--log-level", "WARNING"]
NODE_ARGS = ["--probe-seconds", "0.1", "--log-level", "WARNING"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--replicas", type=int, choices=(1, 2), default=2,
                   help="chains per model: 2 (a replay runs on the other chain) or 1 (on the coordinator's referee)")
    p.add_argument("--prob", type=float, default=DEFAULT_VERIFY_PROB, help="verify prob of the checked run")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-checks-") as tmp:
        root = Path(tmp)
        try:
            coord, ready = start_coordinator(root / "coord", extra_args=COORDINATOR_ARGS)
            procs.append(coord)
            address = f"127.0.0.1:{ready['port']}"
            for i in range(4):
                procs.append(start_node(address, ready["token"], root / f"n{i}", name=f"n{i}", extra_args=NODE_ARGS)[0])
            ckpt = root / "ckpt"
            make_tiny_checkpoint(ckpt, "llama", num_layers=args.layers, hidden_size=args.hidden, num_heads=8, seed=1)
            with CoordinatorClient(address, token=ready["admin_token"]) as client:
                wait_until(lambda: sum(n.state == "online" for n in client.snapshot().nodes) == 4, 60)
                for name, prob in (("off", 0.0), ("checked", args.prob)):
                    client.upload_model(ckpt, name=name, options=ServeOptions(
                        num_replicas=args.replicas, num_stages=2, max_seq_len=128, sessions_per_replica=8, verify_prob=prob))
            runs: dict[str, list[float]] = {"off": [], "checked": []}
            cpu: dict[str, list[float]] = {"off": [], "checked": []}  # CPU s per run: coordinator + nodes
            coord_cpu: dict[str, list[float]] = {"off": [], "checked": []}  # of which the coordinator's
            pids = [p.proc.pid for p in procs]
            for _ in range(args.repeats):
                for name in ("off", "checked"):
                    c0, k0 = tree_cpu_s(pids), tree_cpu_s(pids[:1])
                    r = swarm_run(address, name, args.new_tokens, args.sessions, 1, token=ready["read_token"])
                    cpu[name].append(tree_cpu_s(pids) - c0)
                    coord_cpu[name].append(tree_cpu_s(pids[:1]) - k0)
                    runs[name].append(r["agg_tok_s"])
            with CoordinatorClient(address, token=ready["read_token"]) as client:
                models = {m.name: m for m in client.list_models()}
        finally:
            for proc in reversed(procs):
                proc.stop()
    off, checked = statistics.median(runs["off"]), statistics.median(runs["checked"])
    m = models["checked"]
    rows = [["off", 0.0, off, 1.0, models["off"].num_checks, ""],
            ["checked", args.prob, checked, checked / off, m.num_checks, m.num_check_failures]]
    table = markdown_table(["run", "verify prob", "tokens/s (median)", "vs off", "checks", "failed"], rows)
    cpu_off, cpu_checked = statistics.median(cpu["off"]), statistics.median(cpu["checked"])
    cpu_note = (f"CPU seconds per run (coordinator and nodes; medians) off {cpu_off:.2f}, checked {cpu_checked:.2f}: "
                f"off / checked CPU {cpu_off / cpu_checked:.3f} (the tokens/s ratio to expect where the CPU is the "
                f"bottleneck); all runs: off {[round(v, 2) for v in cpu['off']]}, checked {[round(v, 2) for v in cpu['checked']]}; "
                f"of which the coordinator (medians) off {statistics.median(coord_cpu['off']):.2f}, "
                f"checked {statistics.median(coord_cpu['checked']):.2f}")
    # checked / off of each alternating pair: the box's load drifts between pairs more than within one
    pairs = [c / o for o, c in zip(runs["off"], runs["checked"])]
    cpu_pairs = [o / c for o, c in zip(cpu["off"], cpu["checked"])]
    cpu_note += (f". Per alternating pair (medians): checked / off tokens/s {statistics.median(pairs):.3f}, "
                 f"off / checked CPU {statistics.median(cpu_pairs):.3f}")
    print(table)
    print(cpu_note)
    print(json.dumps({"off_tok_s": runs["off"], "checked_tok_s": runs["checked"], "cpu_s": cpu, "coordinator_cpu_s": coord_cpu}))
    if not args.no_record:
        record("Inference spot checks: tokens/s, checked vs off (bench/inference_checks.py)", table,
               notes=(f"tiny llama {args.layers} layers, hidden {args.hidden}; {args.replicas} replica(s) x 2 stages "
                      f"per model on 4 node processes of this machine"
                      + ("" if args.replicas == 2 else " (one chain: checked windows replay on the coordinator's referee)")
                      + f"; {args.sessions} concurrent greedy sessions x {args.new_tokens} "
                      f"tokens; median of {args.repeats} alternating runs; all runs: off {runs['off']}, "
                      f"checked {runs['checked']}. {cpu_note}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
