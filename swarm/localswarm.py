"""Real processes on this machine: a coordinator and nodes, for demos and tests.

Children are started with ``subprocess.Popen`` in their own session (process group), so
stopping kills everything they started; the parent reads ``READY ...`` lines from their
stdout with a deadline (never sleeps blindly). stderr goes to ``<state_dir>/<name>.log``.
Never forks: only fork+exec, which is safe after gRPC threads exist.

    with LocalSwarm(state_dir, num_nodes=3) as ls:
        print(ls.coordinator_address, ls.token, ls.admin_token, ls.read_token)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from swarm.errors import SwarmError

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for children: finds the repo's packages even without pip install."""
    env = dict(os.environ)
    if (REPO_ROOT / "coordinator").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # many small processes share the cores
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], object], timeout_s: float, *, interval_s: float = 0.1,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (SwarmError, OSError) as exc:  # not ready yet
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout_s:.1f} s" + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval_s)


class ManagedProcess:
    """A child process whose stdout lines are collected and can be waited for."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log_file, stdin=subprocess.DEVNULL,
            env=env if env is not None else child_env(), cwd=cwd, start_new_session=True, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match:
        """The first stdout line matching ``pattern`` (regex search); TimeoutError with the log tail."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self.alive() and not self._reader.is_alive()):
                    state = "timed out" if remaining <= 0 else f"exited with {self.proc.returncode}"
                    raise TimeoutError(
                        f"{self.name}: {state} waiting for /{pattern}/; stdout={self.lines[-5:]}\n"
                        f"--- {self.log_path} ---\n{self.log_tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def send_signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole process group, no goodbye."""
        self.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group; SIGKILL it after ``timeout_s``. Returns the exit code."""
        if self.alive():
            self.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:  # children left in the group (if any) go too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(timeout=5)
        self._log_file.close()
        return self.proc.returncode


def stop_all(procs: list[ManagedProcess], timeout_s: float = 10.0) -> None:
    """Stop processes together: SIGTERM to every one first, then wait for each (their shutdowns
    overlap instead of adding up)."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop(timeout_s)


def start_coordinator(state_dir: Path, *, port: int = 0, http_port: int = 0, host: str = "127.0.0.1",
                      extra_args: list[str] = (), timeout_s: float = 60.0, prefix: list[str] = (),
                      env: dict[str, str] | None = None) -> tuple[ManagedProcess, dict[str, str]]:
    """Start ``swarm-coordinator serve``; returns the process and its READY fields (port, http_port, token:
    the join token, admin_token, read_token) and ``status_page`` (the URL with the read token)."""
    state_dir = Path(state_dir)
    argv = [*prefix, sys.executable, "-m", "coordinator.cli", "serve", "--host", host, "--port", str(port),
            "--http-port", str(http_port), "--state-dir", str(state_dir), *extra_args]
    proc = ManagedProcess("coordinator", argv, log_path=state_dir.parent / f"{state_dir.name}.log", env=env or child_env())
    try:
        m = proc.wait_for_line(r"^READY port=(\d+) http_port=(\d+) token=(\S+)", timeout_s)
    except TimeoutError:
        proc.stop()
        raise
    fields = dict(re.findall(r"(\w+)=(\S+)", m.string))
    page = next((line for line in proc.lines if line.startswith("status page: ")), "")
    fields["status_page"] = page.removeprefix("status page: ")
    return proc, fields


def spawn_node(coordinator_address: str, token: str, state_dir: Path, *, name: str | None = None,
               device: str = "cpu", host: str = "127.0.0.1", extra_args: list[str] = (), prefix: list[str] = (),
               env: dict[str, str] | None = None) -> ManagedProcess:
    """Start ``swarm-node join`` without waiting for it (see :func:`node_ready`)."""
    state_dir = Path(state_dir)
    argv = [*prefix, sys.executable, "-m", "node.cli", "join", "--coordinator", coordinator_address, f"--token={token}",
            "--device", device, "--host", host, "--state-dir", str(state_dir), *extra_args]
    if name:
        argv += ["--name", name]
    return ManagedProcess(name or state_dir.name, argv, log_path=state_dir.parent / f"{state_dir.name}.log",
                          env=env or child_env())


def node_ready(proc: ManagedProcess, *, timeout_s: float = 60.0, wait_for: str = "READY") -> dict[str, str]:
    """The READY (or STARTED) fields of a spawned node (port, node_id); stops it on a timeout."""
    if wait_for not in ("READY", "STARTED"):
        raise ValueError("wait_for must be READY or STARTED")
    try:
        m = proc.wait_for_line(rf"^{wait_for} port=(\d+) node_id=([0-9a-f]+)", timeout_s)
    except TimeoutError:
        proc.stop()
        raise
    return {"port": m.group(1), "node_id": m.group(2)}


def start_node(coordinator_address: str, token: str, state_dir: Path, *, name: str | None = None,
               device: str = "cpu", host: str = "127.0.0.1", extra_args: list[str] = (), timeout_s: float = 60.0,
               prefix: list[str] = (), env: dict[str, str] | None = None,
               wait_for: str = "READY") -> tuple[ManagedProcess, dict[str, str]]:
    """Start ``swarm-node join``; returns the process and its READY fields (port, node_id).

    ``wait_for="STARTED"`` returns as soon as the node serves, before the coordinator accepted
    it (for tests of an unreachable coordinator or a refused registration)."""
    if wait_for not in ("READY", "STARTED"):
        raise ValueError("wait_for must be READY or STARTED")
    proc = spawn_node(coordinator_address, token, state_dir, name=name, device=device, host=host,
                      extra_args=extra_args, prefix=prefix, env=env)
    return proc, node_ready(proc, timeout_s=timeout_s, wait_for=wait_for)


def start_nodes(coordinator_address: str, token: str, state_dirs: list[Path], *, timeout_s: float = 90.0,
                **kwargs) -> list[tuple[ManagedProcess, dict[str, str]]]:
    """Start several nodes at once (their start-ups overlap) and wait until each is READY, in
    order; ``kwargs`` as :func:`spawn_node`'s, with ``name`` taken from each state dir. On a
    failure every node started here is stopped."""
    procs: list[ManagedProcess] = []
    try:
        for d in state_dirs:
            procs.append(spawn_node(coordinator_address, token, Path(d), name=Path(d).name, **kwargs))
        return [(p, node_ready(p, timeout_s=timeout_s)) for p in procs]
    except BaseException:
        stop_all(procs)
        raise


class LocalSwarm:
    """A coordinator and ``num_nodes`` nodes as processes on this machine."""

    def __init__(self, state_dir: Path, *, num_nodes: int, port: int = 0, http_port: int = 0,
                 coordinator_args: list[str] = (), node_args: list[str] = (), host: str = "127.0.0.1") -> None:
        if not 0 <= num_nodes <= 64:
            raise ValueError("num_nodes must be in 0..64")
        self.state_dir = Path(state_dir)
        self.num_nodes = num_nodes
        self._port, self._http_port, self._host = port, http_port, host
        self._coordinator_args, self._node_args = list(coordinator_args), list(node_args)
        self.coordinator: ManagedProcess | None = None
        self.nodes: list[ManagedProcess] = []
        self.node_ids: list[str] = []
        self.ready: dict[str, str] = {}

    @property
    def coordinator_address(self) -> str:
        return f"{self._host}:{self.ready['port']}"

    @property
    def http_url(self) -> str:
        return f"http://{self._host}:{self.ready['http_port']}"

    @property
    def token(self) -> str:
        """The join token (nodes)."""
        return self.ready["token"]

    @property
    def admin_token(self) -> str:
        """The admin token (train, cancel, serve, unserve)."""
        return self.ready["admin_token"]

    @property
    def read_token(self) -> str:
        """The read token (status, jobs, models, generate, the status page, /metrics, /v1)."""
        return self.ready["read_token"]

    @property
    def status_page(self) -> str:
        """The status page's URL with the read token (the browser trades it for a cookie)."""
        return self.ready["status_page"]

    def start(self) -> "LocalSwarm":
        try:
            self.coordinator, self.ready = start_coordinator(
                self.state_dir / "coordinator", port=self._port, http_port=self._http_port, host=self._host,
                extra_args=self._coordinator_args,
            )
            started = start_nodes(self.coordinator_address, self.token,
                                  [self.state_dir / f"node{i}" for i in range(self.num_nodes)], host=self._host,
                                  extra_args=self._node_args)
            for proc, fields in started:
                self.nodes.append(proc)
                self.node_ids.append(fields["node_id"])
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, name: str) -> ManagedProcess:
        proc, fields = start_node(self.coordinator_address, self.token, self.state_dir / name, name=name,
                                  host=self._host, extra_args=self._node_args)
        self.nodes.append(proc)
        self.node_ids.append(fields["node_id"])
        return proc

    def stop(self) -> None:
        stop_all(list(reversed(self.nodes)))
        if self.coordinator is not None:
            self.coordinator.stop()

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def require_online(snapshot, num_nodes: int, *, full_matrix: bool = True) -> bool:
    """True when ``num_nodes`` nodes are online with TFLOPS > 0 and (optionally) every ordered pair measured."""
    online = [n for n in snapshot.nodes if n.state == "online" and n.hardware.tflops > 0]
    if len(online) < num_nodes:
        return False
    if not full_matrix:
        return True
    ids = {n.id for n in online}
    pairs = {(link.src, link.dst) for link in snapshot.links if link.src in ids and link.dst in ids}
    return len(pairs) >= len(ids) * (len(ids) - 1)


__all__ = ["LocalSwarm", "ManagedProcess", "start_coordinator", "start_node", "wait_until", "child_env",
           "require_online"]
