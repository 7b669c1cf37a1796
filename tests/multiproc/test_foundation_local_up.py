"""``swarm local up`` starts real processes, prints the address and token, and Ctrl-C stops all of them."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from swarm.localswarm import ManagedProcess, child_env, wait_until
from swarm.transport.coordinator_client import CoordinatorClient

pytestmark = pytest.mark.multiproc


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.timeout(90)
def test_local_up_then_ctrl_c(tmp_path):
    proc = ManagedProcess("local-up", [sys.executable, "-m", "swarm.cli", "local", "up", "--nodes", "2",
                                       "--state-dir", str(tmp_path)], log_path=tmp_path / "local-up.log", env=child_env())
    try:
        m = proc.wait_for_line(r"^coordinator: (\S+)\s+token: (\S+)", 60)
        address = m.group(1)
        children = _children_of(proc.pid)
        assert len(children) == 3  # coordinator + 2 nodes
        with CoordinatorClient(address, token=m.group(2)) as client:
            wait_until(lambda: sum(n.state == "online" for n in client.snapshot().nodes) == 2, 30,
                       message="2 nodes online")
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C goes to the `swarm local up` process
        proc.proc.wait(timeout=30)
        assert proc.proc.returncode == 0
        assert proc.wait_for_line(r"^stopped", 5)
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        proc.stop()
