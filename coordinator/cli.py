"""``swarm-coordinator serve``: run a coordinator until SIGINT/SIGTERM.

Prints ``status page: URL`` and then ``READY port=N http_port=M token=J admin_token=A read_token=R``
on stdout once serving (scripts read them): J is the join token (nodes), A the admin token
(changes), R the read token (status, page, /v1). ``swarm-coordinator token`` prints one of them
without serving; ``swarm-coordinator rotate-token`` replaces one, and a running coordinator of
that state dir refuses the old one from then on (coordinator/credentials.py).
Precedence: flags > SWARM_* environment > defaults.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from swarm import log as swarm_log
from swarm.errors import SwarmError
from swarm.statedir import private_umask


def _env(name: str, default):
    return os.environ.get(f"SWARM_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-coordinator", description="Run a swarm coordinator.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="serve the control plane (gRPC) and the status API (HTTP)")
    s.add_argument("--host", default=_env("COORDINATOR_HOST", "0.0.0.0"), help="listen address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=int(_env("COORDINATOR_PORT", 7070)), help="gRPC port; 0 picks a free one (default 7070)")
    s.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 7080)), help="HTTP port; 0 picks a free one (default 7080)")
    s.add_argument("--state-dir", default=_env("STATE_DIR", str(Path.home() / ".swarm" / "coordinator")), help="SQLite and the join token live here")
    s.add_argument("--token", default=_env("TOKEN", None), help="the join token's secret, for nodes (default: kept in the state dir, created on first start)")
    s.add_argument("--admin-token", default=_env("ADMIN_TOKEN", None), help="the admin token's secret: submit, cancel, serve, unserve (default: kept in the state dir, created on first start)")
    s.add_argument("--read-token", default=_env("READ_TOKEN", None), help="the read token's secret: status, jobs, models, the status page, /metrics, /v1 (default: kept in the state dir, created on first start)")
    s.add_argument("--public-status", action="store_true", help="let anyone read /api, /metrics, the status page and the read RPCs without a token (never peer addresses or job assignments)")
    s.add_argument("--api-key", action="append", default=[], help="an API key /v1 accepts as 'Authorization: Bearer KEY' (repeatable); with any key set, /v1 takes only keys")
    s.add_argument("--api-keys-file", default=_env("API_KEYS_FILE", None), help="a file of /v1 API keys, one per line, re-read when it changes")
    s.add_argument("--heartbeat-interval-s", type=float, default=2.0, help="heartbeat interval told to nodes (default 2)")
    s.add_argument("--node-timeout-s", type=float, default=6.0, help="a node silent this long is lost (default 6)")
    s.add_argument("--restart-grace-s", type=float, default=None,
                   help="after a start, nodes restored from the state dir have this long to re-register before "
                        "any is declared lost (default: 3 x --node-timeout-s)")
    s.add_argument("--remeasure-interval-s", type=float, default=300.0, help="re-measure each link this often (default 300)")
    s.add_argument("--probe-bytes", type=int, default=4 << 20, help="bytes streamed per bandwidth measurement (default 4 MiB)")
    s.add_argument("--num-pings", type=int, default=5, help="round trips per RTT measurement (default 5)")
    g = s.add_argument_group("limits (what strangers holding the join token can do)")
    g.add_argument("--max-identities-per-token", type=int, default=int(_env("MAX_IDENTITIES_PER_TOKEN", 5000)),
                   help="node identities one join token may register (default 5000)")
    g.add_argument("--max-new-identities-per-min", type=int, default=int(_env("MAX_NEW_IDENTITIES_PER_MIN", 600)),
                   help="new node identities one join token may register per minute (default 600)")
    g.add_argument("--lost-node-ttl-s", type=float, default=float(_env("LOST_NODE_TTL_S", 3600)),
                   help="forget nodes lost or left this long ago, freeing their place (default 3600)")
    g.add_argument("--max-model-params", type=int, default=int(_env("MAX_MODEL_PARAMS", 2_000_000_000)),
                   help="largest model a job may train, in parameters (default 2e9)")
    g.add_argument("--stream-idle-timeout-s", type=float, default=float(_env("STREAM_IDLE_TIMEOUT_S", 60)),
                   help="cancel a gRPC stream that waited this long on the other side (default 60)")
    g.add_argument("--max-streams-per-peer", type=int, default=int(_env("MAX_STREAMS_PER_PEER", 16)),
                   help="concurrent gRPC streams from one remote IP (default 16)")
    g.add_argument("--flush-interval-s", type=float, default=5.0,
                   help="write heartbeats to SQLite this often; kept in memory between (default 5)")
    s.add_argument("--relay-port", type=int, default=int(_env("RELAY_PORT", 0)),
                   help="TCP port relaying traffic to nodes nobody can dial (behind NAT); 0 picks one, -1 turns "
                        "relaying off (default 0)")
    s.add_argument("--relay-rate-mbit", type=float, default=float(_env("RELAY_RATE_MBIT", 1000)),
                   help="cap on all relayed traffic, both ways together, in Mbit/s (default 1000)")
    s.add_argument("--advertise-host", action="append", default=[], help="a name or address nodes and users reach this coordinator by; added to its TLS certificate (repeatable)")
    s.add_argument("--tls-san", action="append", default=[], help="another name or IP for the coordinator's TLS certificate (repeatable)")
    s.add_argument("--node-cert-lifetime-s", type=float, default=86400.0, help="lifetime of nodes' TLS certificates, renewed over heartbeats past half of it (default 86400)")
    s.add_argument("--tls-cert", default=_env("TLS_CERT", None), help="serve the HTTP port as HTTPS with this PEM certificate chain (a real certificate for a public host)")
    s.add_argument("--tls-key", default=_env("TLS_KEY", None), help="the private key of --tls-cert")
    s.add_argument("--publish-token", default=None, help="also write the token to this file (0600), e.g. a volume that local nodes read with --token-file")
    s.add_argument("--no-rebalance", action="store_true", default=_env("NO_REBALANCE", "") == "1",
                   help="never move a running job's layers around a node its neighbours see slow, nor take an idle "
                        "node in by moving layers to it (default: at a fence when that predicts a 20%% faster step, "
                        "without rollback; slow_node is reported either way)")
    s.add_argument("--no-helpers", action="store_true", default=_env("NO_HELPERS", "") == "1",
                   help="never add idle nodes to a running job as helper replicas of its slowest stage (default: a job "
                        "at its --replicas takes one idle node per pipeline as helpers at a fence, without rollback)")
    s.add_argument("--referee-gflops", type=float, default=float(_env("REFEREE_GFLOPS", 20)),
                   help="CPU GFLOP/s per served model the coordinator may spend re-computing spot-check windows of "
                        "models with no second chain (docs/inference.md, 'Without another chain'); 0: no referee, "
                        "such windows go unchecked (default 20)")
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    t = sub.add_parser("token", help="create the CA and the tokens in --state-dir (if missing) and print one, without serving")
    t.add_argument("--state-dir", default=_env("STATE_DIR", str(Path.home() / ".swarm" / "coordinator")))
    t.add_argument("--token", default=_env("TOKEN", None), help="the join token's secret to use (default: the stored one, or a new one)")
    t.add_argument("--kind", choices=("join", "admin", "read"), default="join", help="which token to print (default join)")
    r = sub.add_parser("rotate-token", help="replace a token; a running coordinator of --state-dir refuses the old one "
                                            "from its next check on (registered nodes keep their sessions)")
    r.add_argument("--state-dir", default=_env("STATE_DIR", str(Path.home() / ".swarm" / "coordinator")))
    r.add_argument("--kind", choices=("join", "admin", "read"), required=True, help="which token to replace")
    r.add_argument("--secret", default=None, help="the new secret (default: a new random one)")
    return parser


def print_token(args: argparse.Namespace) -> int:
    from coordinator.app import prepare_tokens
    from coordinator.ca import CoordinatorCA
    from coordinator.store import Database

    try:
        state_dir = Path(args.state_dir).expanduser()
        state_dir.mkdir(parents=True, exist_ok=True)
        import time

        tokens = prepare_tokens(Database(state_dir), state_dir, CoordinatorCA(state_dir, now_s=time.time()),
                                join=args.token)
        print(tokens[args.kind])
    except (SwarmError, ValueError, OSError) as exc:
        print(f"swarm-coordinator: {exc}", file=sys.stderr)
        return 2
    return 0


def rotate_token(args: argparse.Namespace) -> int:
    import time

    from coordinator import credentials
    from coordinator.ca import CA_CERT_FILE, CoordinatorCA
    from coordinator.store import Database

    state_dir = Path(args.state_dir).expanduser()
    try:
        if not (state_dir / CA_CERT_FILE).is_file():
            raise SwarmError(f"{state_dir} holds no coordinator state (no {CA_CERT_FILE}); pass the --state-dir "
                             "the coordinator serves from")
        ca = CoordinatorCA(state_dir, now_s=time.time())
        token = credentials.rotate(Database(state_dir), state_dir, ca.fingerprint, args.kind, args.secret)
    except (SwarmError, ValueError, OSError) as exc:
        print(f"swarm-coordinator: {exc}", file=sys.stderr)
        return 2
    print(token)
    print(f"the old {args.kind} token is refused from now on (a running coordinator notices within its next call); "
          f"the new one is in {state_dir / credentials.TOKEN_FILES[args.kind]}", file=sys.stderr)
    return 0


def status_page_url(args: argparse.Namespace, http_port: int, read_token: str) -> str:
    """Where a browser opens the status page with the read token (it becomes a cookie there)."""
    from urllib.parse import quote

    host = (args.advertise_host or [None])[0] or (args.host if args.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if args.tls_cert else 'http'}://{host}:{http_port}/?token={quote(read_token, safe='')}"


def serve(args: argparse.Namespace) -> int:
    import sqlite3

    from coordinator.admission import AdmissionPolicy
    from coordinator.app import CoordinatorApp, CoordinatorConfig
    from coordinator.network import MeasurementPolicy
    from swarm.statedir import secure_state_dir
    from swarm.transport.limits import StreamLimits
    from swarm.transport.relay import RelayLimits
    from swarm.transport.tls import bench_plaintext

    state_dir = Path(args.state_dir).expanduser()
    try:
        if args.max_model_params < 1:
            raise ValueError("--max-model-params must be >= 1")
        if args.flush_interval_s <= 0:
            raise ValueError("--flush-interval-s must be > 0")
        secure_state_dir(state_dir)
        config = CoordinatorConfig(
            state_dir=state_dir, host=args.host, port=args.port, http_port=args.http_port,
            join_token=args.token, admin_token=args.admin_token, read_token=args.read_token,
            public_status=args.public_status, api_keys=tuple(args.api_key),
            api_keys_file=Path(args.api_keys_file).expanduser() if args.api_keys_file else None,
            heartbeat_interval_s=args.heartbeat_interval_s, node_timeout_s=args.node_timeout_s,
            restart_grace_s=args.restart_grace_s,
            sweep_interval_s=min(0.5, args.heartbeat_interval_s / 2),
            tls_sans=tuple(args.advertise_host + args.tls_san), node_cert_lifetime_s=args.node_cert_lifetime_s,
            http_tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            http_tls_key=Path(args.tls_key) if args.tls_key else None,
            bench_plaintext=bench_plaintext(os.environ),
            measurement=MeasurementPolicy(
                remeasure_interval_s=args.remeasure_interval_s, probe_bytes=args.probe_bytes, num_pings=args.num_pings,
            ),
            admission=AdmissionPolicy(
                max_identities_per_token=args.max_identities_per_token,
                max_new_identities_per_min=args.max_new_identities_per_min, lost_node_ttl_s=args.lost_node_ttl_s,
            ),
            stream_limits=StreamLimits(idle_timeout_s=args.stream_idle_timeout_s,
                                       max_streams_per_peer=args.max_streams_per_peer),
            max_model_params=args.max_model_params, flush_interval_s=args.flush_interval_s,
            rebalance=not args.no_rebalance, helpers=not args.no_helpers, referee_flops_per_s=args.referee_gflops * 1e9,
            relay_port=None if args.relay_port == -1 else args.relay_port,
            relay_limits=RelayLimits(rate_Bps=args.relay_rate_mbit * 1e6 / 8),
        )
        app = CoordinatorApp(config)
        port, http_port = app.start()
    except (SwarmError, ValueError) as exc:
        print(f"swarm-coordinator: {exc}", file=sys.stderr)
        return 2
    except (sqlite3.DatabaseError, OSError) as exc:  # what the start-up check cannot foresee (disk, I/O)
        print(f"swarm-coordinator: cannot use the state in {state_dir}: {exc}; free disk space, or restore the "
              f"state dir from a backup or move it aside to start fresh", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    join_token, admin_token, read_token = app.join_token, app.admin_token, app.read_token
    print(
        f"coordinator ready: nodes join with (the join token: it lets them join, nothing else)\n"
        f"  swarm-node join --coordinator <this-host>:{port} --token {join_token}\n"
        f"changes (train, cancel, serve, unserve) take the admin token:\n"
        f"  swarm jobs --coordinator <this-host>:{port} --token {admin_token}\n"
        f"reading (status, jobs, models, generate, the status page, /metrics, /v1) takes the read token:\n"
        f"  swarm status --coordinator <this-host>:{port} --token {read_token}\n"
        f"(the tokens are also in {state_dir}/token, admin_token and read_token; "
        f"swarm-coordinator rotate-token replaces one{'; status is public' if args.public_status else ''})",
        file=sys.stderr,
    )
    if args.publish_token:
        path = Path(args.publish_token)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(join_token + "\n")
    print(f"status page: {status_page_url(args, http_port, read_token)}", flush=True)
    print(f"READY port={port} http_port={http_port} token={join_token} admin_token={admin_token} "
          f"read_token={read_token} relay_port={app.reachability.relay_port}", flush=True)
    stop.wait()
    app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "token":
        return print_token(args)
    if args.command == "rotate-token":
        private_umask()
        return rotate_token(args)
    if args.command != "serve":
        parser.print_help()
        return 2
    private_umask()  # state (token, SQLite, job files) is created 0600 / 0700
    swarm_log.configure(args.log_level)
    swarm_log.dump_stacks_on_sigusr1()
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
