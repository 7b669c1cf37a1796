"""``swarm local up --nodes N [--port P]`` and ``swarm local demo``: a real swarm on this machine.

``up`` starts a coordinator and N nodes as processes, prints the coordinator address and the
token, and stops them all on Ctrl-C. ``demo`` starts 3 nodes, waits until all are online with a
full bandwidth matrix, prints ``swarm status``, fine-tunes a tiny model across the nodes with
AQ-SGD, serves the result as a 3-stage inference chain, generates from it and stops everything.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("local", help="run a swarm of local processes (demo, tests)")
    sub = p.add_subparsers(dest="local_command", metavar="ACTION")
    up = sub.add_parser("up", help="start a coordinator and N nodes; Ctrl-C stops them")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--port", type=int, default=0, help="coordinator gRPC port (default: free port)")
    up.add_argument("--http-port", type=int, default=0, help="coordinator HTTP port (default: free port)")
    up.add_argument("--state-dir", default=None, help="default: a fresh temporary directory")
    up.set_defaults(func=run_up)
    demo = sub.add_parser(
        "demo",
        help="3 local nodes: status with the measured network, AQ-SGD fine-tuning of a tiny model across "
             "them, serving the result as an inference chain, a generation from it; then stop",
        description="Start a coordinator and 3 nodes on this machine, wait until the network matrix is "
                    "measured and print `swarm status`, fine-tune a tiny model as a 3-stage pipeline with "
                    "AQ-SGD (aqsgd:fw=4,bw=8) while printing the loss, write the HF checkpoint, serve it "
                    "as a 3-stage inference chain, stream a generation from it, and stop everything "
                    "(~30 s on 2 cores).")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--timeout-s", type=float, default=120.0)
    demo.add_argument("--state-dir", default=None)
    demo.add_argument("--train-steps", type=int, default=40, help="fine-tuning steps of the demo (0: skip training)")
    demo.add_argument("--no-generate", action="store_true",
                      help="skip serving the fine-tuned checkpoint and generating from it")
    demo.set_defaults(func=run_demo)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _state_dir(arg: str | None) -> Path:
    return Path(arg) if arg else Path(tempfile.mkdtemp(prefix="swarm-local-"))


def run_up(args: argparse.Namespace) -> int:
    from swarm.localswarm import LocalSwarm

    ls = LocalSwarm(_state_dir(args.state_dir), num_nodes=args.nodes, port=args.port, http_port=args.http_port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with ls:
        # "token:" is the admin token (changes and reads); nodes join with the join token.
        print(f"coordinator: {ls.coordinator_address}  token: {ls.admin_token}  (admin: train, cancel, serve)",
              flush=True)
        print(f"status:      swarm status --coordinator {ls.coordinator_address} --token {ls.read_token}", flush=True)
        print(f"status page: {ls.status_page}", flush=True)
        print(f"join more:   swarm-node join --coordinator {ls.coordinator_address} --token {ls.token} "
              f"--state-dir DIR", flush=True)
        print(f"state dir:   {ls.state_dir} (logs: *.log)   Ctrl-C stops everything", flush=True)
        while not done.wait(0.5):
            dead = [p.name for p in [ls.coordinator, *ls.nodes] if p is not None and not p.alive()]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)} (see logs in {ls.state_dir})", file=sys.stderr)
                return 1
    print("stopped", flush=True)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from swarm.cli.status import render_table
    from swarm.localswarm import LocalSwarm, require_online, wait_until
    from swarm.transport.coordinator_client import CoordinatorClient

    state_dir = _state_dir(args.state_dir)
    print(f"starting a coordinator and {args.nodes} nodes (state and logs in {state_dir}) ...", flush=True)
    # Short intervals so the demo finishes in seconds; a real swarm uses the defaults.
    ls = LocalSwarm(state_dir, num_nodes=args.nodes,
                    coordinator_args=["--heartbeat-interval-s", "0.5", "--node-timeout-s", "3", "--probe-bytes", str(1 << 20)],
                    node_args=["--probe-seconds", "0.3"])
    with ls:
        print(f"coordinator {ls.coordinator_address} (status page {ls.status_page}); waiting for nodes and link "
              "measurements ...", flush=True)
        try:
            with CoordinatorClient(ls.coordinator_address, token=ls.read_token) as client:
                def ready():
                    snapshot = client.snapshot()
                    return snapshot if require_online(snapshot, args.nodes) else None

                snap = wait_until(
                    ready, args.timeout_s, interval_s=0.3,
                    message=f"{args.nodes} nodes online with a full bandwidth matrix",
                )
        except TimeoutError as exc:
            print(f"demo failed: {exc}; logs in {state_dir}", file=sys.stderr)
            return 1
        print()
        print(render_table(snap))
        print()
        if args.train_steps > 0:  # training across the swarm (swarm.cli.train)
            from swarm.cli.train import demo_fine_tune

            if demo_fine_tune(ls.coordinator_address, Path(state_dir), token=ls.admin_token, steps=args.train_steps,
                              out=lambda line: print(line, flush=True)) != 0:
                return 1
            if not args.no_generate and _demo_generate(ls.coordinator_address, Path(state_dir) / "demo-checkpoint", ls.admin_token) != 0:
                return 1
    print("demo finished: all processes stopped", flush=True)
    return 0


def _demo_generate(coordinator: str, checkpoint: Path, token: str) -> int:
    """The demo's inference part: serve the checkpoint just trained as a 3-stage chain over the
    same nodes, then stream a greedy generation from it."""
    from swarm.cli.serve import run_generation
    from swarm.errors import SwarmError
    from swarm.inference.sampling import SamplingParams
    from swarm.transport.coordinator_client import CoordinatorClient, ServeOptions

    print("serving the fine-tuned checkpoint as a 3-stage inference chain ...", flush=True)
    try:
        with CoordinatorClient(coordinator, token=token) as client:
            info = client.upload_model(checkpoint, name="demo", options=ServeOptions(num_stages=3, max_seq_len=128))
            chain = " -> ".join(
                f"{st.node_id[:8]} layers {st.first_layer}-{st.last_layer_excl - 1}"
                for st in (info.replicas[0].stages if info.replicas else ())
            )
            if chain:
                print(f"  chain: {chain}", flush=True)
            prompt = "The swarm"
            print(f"generating from {prompt!r}: {prompt}", end="", flush=True)
            res = run_generation(client, model="demo", prompt=prompt,
                                 params=SamplingParams(max_new_tokens=24),
                                 on_text=lambda t: print(t, end="", flush=True))
    except SwarmError as exc:
        print(f"\ngeneration failed: {exc}", file=sys.stderr)
        return 1
    print(f"\n{len(res.token_ids)} tokens, first after {res.time_to_first_token_s * 1e3:.0f} ms, "
          f"{res.tokens_per_s:.1f} tokens/s", flush=True)
    return 0
