"""``swarm-node join``: join a swarm and serve until SIGINT/SIGTERM, then leave cleanly.

Prints ``STARTED port=N node_id=ID`` once the peer server is serving, then ``READY port=N
node_id=ID`` on stdout once the coordinator accepted the registration (while the coordinator is unreachable the node retries by itself and
prints nothing yet). A refused registration (wrong token, the coordinator's HTTP port given as
``--coordinator``, an incompatible version) exits 1 with the reason on stderr.
Precedence: flags > SWARM_* environment > defaults (``--coordinator``/``--token`` as every
`swarm` command: see :mod:`swarm.cli.common`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from swarm import log as swarm_log
from swarm.cli.common import add_common_flags, target_from_args
from swarm.errors import SwarmError
from swarm.statedir import private_umask


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="swarm-node", description="Join a swarm as a volunteer node.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    j = sub.add_parser("join", help="join a coordinator and serve")
    add_common_flags(j)  # --coordinator, --token (the join token printed by the coordinator)
    j.add_argument("--name", default=env("SWARM_NODE_NAME"), help="display name (default hostname-<id>)")
    j.add_argument("--device", default=env("SWARM_DEVICE", "cpu"), help="cpu, cuda or cuda:K (default cpu)")
    j.add_argument("--host", default=env("SWARM_NODE_HOST", "0.0.0.0"), help="peer service listen address")
    j.add_argument("--port", type=int, default=int(env("SWARM_NODE_PORT", "0")), help="peer service port (default 0: free)")
    j.add_argument("--advertise-host", default=env("SWARM_ADVERTISE_HOST"), help="address other nodes dial (default: the local IP towards the coordinator)")
    j.add_argument("--state-dir", default=env("SWARM_STATE_DIR", str(Path.home() / ".swarm" / "node")), help="identity key and node files")
    j.add_argument("--heartbeat-interval-s", type=float, default=None, help="override the coordinator's heartbeat interval")
    j.add_argument("--probe-seconds", type=float, default=1.0, help="duration of the matmul TFLOPS probe (default 1)")
    j.add_argument("--stream-idle-timeout-s", type=float, default=float(env("SWARM_STREAM_IDLE_TIMEOUT_S", "60")),
                   help="cancel a peer stream that waited this long on the other side (default 60)")
    j.add_argument("--max-streams-per-peer", type=int, default=int(env("SWARM_MAX_STREAMS_PER_PEER", "8")),
                   help="concurrent peer streams from one remote IP (default 8)")
    j.add_argument("--token-file", default=env("SWARM_TOKEN_FILE"), help="read the token from this file (waits up to 120 s for it to appear), e.g. one the coordinator writes with --publish-token")
    j.add_argument("--relay", action="store_true", default=env("SWARM_RELAY", "") == "1",
                   help="offer relaying to nodes nobody can dial (behind NAT); only used when this node is itself "
                        "reachable directly")
    j.add_argument("--relay-port", type=int, default=int(env("SWARM_RELAY_PORT", "0")),
                   help="with --relay: the TCP port to relay on (default 0: free)")
    j.add_argument("--relay-rate-mbit", type=float, default=float(env("SWARM_RELAY_RATE_MBIT", "1000")),
                   help="with --relay: cap on relayed traffic, both ways together, in Mbit/s (default 1000)")
    j.add_argument("--no-hole-punching", action="store_true", default=env("SWARM_NO_HOLE_PUNCHING", "") == "1",
                   help="behind NAT: reach other NAT'd nodes only through the relay (default: punch holes, "
                        "falling back to the relay)")
    j.add_argument("--step-wire-port", type=int, default=int(env("SWARM_STEP_WIRE_PORT", "0")),
                   help="TCP port of the inference step wire, the fast path of generation steps between stages "
                        "(default 0: free; -1: none, steps go over gRPC). Open it like --port to be fast for peers")
    j.add_argument("--log-level", default=env("SWARM_LOG_LEVEL", "INFO"))
    return parser


def join(args: argparse.Namespace) -> int:
    from node.agent import NodeAgent, NodeConfig
    from swarm.faults import FAULT_ENV, FaultConfig
    from swarm.statedir import secure_state_dir
    from swarm.transport.limits import StreamLimits
    from swarm.transport.relay import RelayLimits
    from swarm.transport.tls import bench_plaintext

    target = target_from_args(args)
    if args.token_file and not target.token:
        import time

        path = Path(args.token_file)
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)  # the coordinator writes it once it serves (compose starts us together)
        if not path.exists():
            print(f"swarm-node: no token file at {path} after 120 s; is the coordinator running?", file=sys.stderr)
            return 2
        target = type(target)(address=target.address, token=path.read_text().strip())
    try:
        state_dir = Path(args.state_dir).expanduser()
        secure_state_dir(state_dir)
        faults = FaultConfig.parse(os.environ.get(FAULT_ENV))  # testing only: see swarm/faults.py
        config = NodeConfig(
            coordinator_address=target.address, token=target.token or "", state_dir=state_dir,
            name=args.name, device=args.device, host=args.host, port=args.port, advertise_host=args.advertise_host,
            heartbeat_interval_s=args.heartbeat_interval_s, matmul_duration_s=args.probe_seconds,
            stream_limits=StreamLimits(idle_timeout_s=args.stream_idle_timeout_s,
                                       max_streams_per_peer=args.max_streams_per_peer),
            bench_plaintext=bench_plaintext(os.environ),
            faults=faults,
            relay_port=args.relay_port if args.relay else None, hole_punching=not args.no_hole_punching,
            step_wire_port=args.step_wire_port,
            relay_limits=RelayLimits(rate_Bps=args.relay_rate_mbit * 1e6 / 8),
        )
        agent = NodeAgent(config)
        port = agent.start()
    except (SwarmError, ValueError) as exc:
        print(f"swarm-node: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"STARTED port={port} node_id={agent.node_id}", flush=True)  # serving; not registered yet
    # READY only once the coordinator accepted the node: a refused registration (wrong token,
    # wrong port, old version) exits non-zero with its message and never claims to be ready.
    while not (agent.wait_registered(0.2) or agent.stopped or done.is_set()):
        pass
    if agent.wait_registered(0):
        print(f"READY port={port} node_id={agent.node_id}", flush=True)
    while not done.wait(0.2):
        if agent.stopped:
            break
    agent.stop(leave=True)
    if agent.fatal_error is not None:
        print(f"swarm-node: {agent.fatal_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "join":
        parser.print_help()
        return 2
    private_umask()  # identity key, shards, checkpoints are created 0600 / 0700
    swarm_log.configure(args.log_level)
    swarm_log.dump_stacks_on_sigusr1()
    return join(args)


if __name__ == "__main__":
    sys.exit(main())
