"""Multi-process test helpers: start a coordinator and nodes as real subprocesses.

    from tests.helpers.procs import coordinator_proc, node_proc, wait_until, FAST_COORDINATOR_ARGS

    def test_x(tmp_path):
        with coordinator_proc(tmp_path / "coord") as coord:        # coord.address, .http_url, .token (join),
                                                                    # .admin_token, .read_token
            with node_proc(coord, tmp_path / "n0") as n0:           # n0.node_id, n0.port, n0.proc
                wait_until(lambda: ..., timeout_s=20)

Children print ``READY port=N ...``; helpers wait for that line with a deadline, pass
``--device cpu`` and short intervals (FAST_*_ARGS), and kill whole process groups on exit.
Logs of each child are in ``<state_dir>.log`` (shown in the TimeoutError on start failures).
Spawn only (fork+exec); never ``multiprocessing`` with fork after gRPC exists.
"""

from __future__ import annotations

import json
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from swarm.localswarm import (ManagedProcess, child_env, require_online, start_coordinator, start_node, start_nodes,
                              stop_all, wait_until)
from swarm.transport.coordinator_client import CoordinatorClient, ServeOptions

# Short intervals for tests: heartbeat 0.3 s, lost after 3 s (robust on a loaded 2-core box), small probes.
# --no-rebalance: a test of something else must not see its job's layers move because a loaded
# CI box made a node look slow (the re-balance's own test turns it back on: REBALANCE_COORDINATOR_ARGS);
# --no-helpers: nor its idle spare node join a running job as a helper (HELPER_COORDINATOR_ARGS)
FAST_COORDINATOR_ARGS = ["--heartbeat-interval-s", "0.3", "--node-timeout-s", "3", "--probe-bytes", str(512 << 10),
                         "--num-pings", "3", "--log-level", "INFO", "--no-rebalance", "--no-helpers"]
REBALANCE_COORDINATOR_ARGS = [a for a in FAST_COORDINATOR_ARGS if a != "--no-rebalance"]
HELPER_COORDINATOR_ARGS = [a for a in FAST_COORDINATOR_ARGS if a != "--no-helpers"]
FAST_NODE_ARGS = ["--probe-seconds", "0.1", "--log-level", "INFO"]


@dataclass
class CoordinatorHandle:
    proc: ManagedProcess
    state_dir: Path
    port: int
    http_port: int
    token: str  # the join token (nodes)
    admin_token: str = ""  # changes: submit, cancel, serve, unserve
    read_token: str = ""  # reads: status, jobs, models, generate, /api, /metrics, /v1
    status_page: str = ""  # the page's URL with the read token
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def get_json(self, path: str, timeout_s: float = 10.0, *, token: str | None = None):
        """GET ``path`` of the HTTP port with ``Authorization: Bearer`` the read token (or ``token``)."""
        req = urllib.request.Request(self.http_url + path,
                                     headers={"Authorization": f"Bearer {token or self.read_token}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def snapshot(self):
        with self.client(token=False) as client:
            return client.snapshot()

    def models(self) -> list[dict]:
        """The served models as ``swarm models --json`` prints them."""
        with self.client(token=False) as client:
            return [m.to_json() for m in client.list_models()]

    def serve(self, model_dir, *, name: str, **options) -> dict:
        """Upload and serve ``model_dir`` with this coordinator's admin token (``options``: ServeOptions fields)."""
        with self.client() as client:
            return client.upload_model(model_dir, name=name, options=ServeOptions(**options)).to_json()

    @property
    def fingerprint_token(self) -> str:
        """``swarm1.<CA fingerprint>``: verifies the coordinator (TLS), grants nothing."""
        return self.token.rsplit(".", 1)[0]

    def client(self, *, token: bool = True) -> CoordinatorClient:
        """A TLS client of this coordinator (every token pins its CA), with the admin token, or the
        read token when ``token=False``."""
        return CoordinatorClient(self.address, token=self.admin_token if token else self.read_token)


@dataclass
class NodeHandle:
    proc: ManagedProcess
    state_dir: Path
    port: int
    node_id: str


def launch_coordinator(state_dir: Path, *, port: int = 0, http_port: int = 0, extra_args: list[str] | None = None,
                       timeout_s: float = 60.0) -> CoordinatorHandle:
    args = FAST_COORDINATOR_ARGS if extra_args is None else extra_args
    proc, ready = start_coordinator(Path(state_dir), port=port, http_port=http_port, extra_args=args, timeout_s=timeout_s)
    return CoordinatorHandle(proc=proc, state_dir=Path(state_dir), port=int(ready["port"]),
                             http_port=int(ready["http_port"]), token=ready["token"],
                             admin_token=ready["admin_token"], read_token=ready["read_token"],
                             status_page=ready["status_page"])


def launch_node(coord: CoordinatorHandle | str, state_dir: Path, *, token: str | None = None, name: str | None = None,
                extra_args: list[str] | None = None, timeout_s: float = 60.0, wait_for: str = "READY",
                env: dict[str, str] | None = None) -> NodeHandle:
    """``env``: extra environment variables for the node (e.g. ``SWARM_FAULT``)."""
    address = coord if isinstance(coord, str) else coord.address
    token = token if token is not None else coord.token  # type: ignore[union-attr]
    args = FAST_NODE_ARGS if extra_args is None else extra_args
    proc, ready = start_node(address, token, Path(state_dir), name=name or Path(state_dir).name, extra_args=args,
                             timeout_s=timeout_s, wait_for=wait_for, env=child_env(env) if env else None)
    return NodeHandle(proc=proc, state_dir=Path(state_dir), port=int(ready["port"]), node_id=ready["node_id"])


def launch_nodes(coord: CoordinatorHandle, state_dirs: list[Path], *, extra_args: list[str] | None = None,
                 timeout_s: float = 90.0, env: dict[str, str] | None = None) -> list[NodeHandle]:
    """Start nodes at once (their start-ups overlap: ~2.5 s each saved on 2 cores); READY in order.
    ``env``: added to every node's environment (e.g. SWARM_FAULT)."""
    args = FAST_NODE_ARGS if extra_args is None else extra_args
    started = start_nodes(coord.address, coord.token, [Path(d) for d in state_dirs], extra_args=args,
                          timeout_s=timeout_s, env=child_env(env) if env else None)
    return [NodeHandle(proc=p, state_dir=Path(d), port=int(f["port"]), node_id=f["node_id"])
            for (p, f), d in zip(started, state_dirs)]


@contextmanager
def nodes_proc(coord: CoordinatorHandle, state_dirs: list[Path], **kwargs):
    """:func:`launch_nodes` as a context: yields the handles, stops every node on exit."""
    handles = launch_nodes(coord, state_dirs, **kwargs)
    try:
        yield handles
    finally:
        stop_all([h.proc for h in handles])


@contextmanager
def coordinator_proc(state_dir: Path, **kwargs):
    handle = launch_coordinator(state_dir, **kwargs)
    try:
        yield handle
    finally:
        handle.proc.stop()


@contextmanager
def node_proc(coord: CoordinatorHandle | str, state_dir: Path, **kwargs):
    handle = launch_node(coord, state_dir, **kwargs)
    try:
        yield handle
    finally:
        handle.proc.stop()


__all__ = ["CoordinatorHandle", "NodeHandle", "launch_coordinator", "launch_node", "launch_nodes", "coordinator_proc",
           "node_proc", "nodes_proc", "stop_all",
           "wait_until", "require_online", "child_env", "ManagedProcess", "FAST_COORDINATOR_ARGS", "FAST_NODE_ARGS"]


def generate_events(coord: CoordinatorHandle, **kwargs):
    """Stream a generation from ``coord`` (CoordinatorClient.generate's kwargs) with the read token."""
    with coord.client(token=False) as client:
        yield from client.generate(**kwargs)
