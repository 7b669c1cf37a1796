"""``kill -USR1`` on a running coordinator or node writes every thread's stack to its log and the
process carries on (swarm/log.py ``dump_stacks_on_sigusr1``): what to attach when one seems stuck."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers.procs import coordinator_proc, node_proc, wait_until

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(90)
def test_sigusr1_dumps_the_stacks_and_the_services_carry_on(tmp_path):
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0") as node:
        wait_until(lambda: any(n.state == "online" for n in coord.snapshot().nodes), 60, message="node online")
        for handle in (coord, node):
            os.kill(handle.proc.pid, signal.SIGUSR1)
            wait_until(lambda h=handle: "most recent call first" in h.proc.log_path.read_text(errors="replace"), 20,
                       message=f"a stack dump in {handle.proc.log_path.name}")
            assert handle.proc.proc.poll() is None  # still running
        # and still serving: the node heartbeats on, the coordinator answers
        wait_until(lambda: [n.state for n in coord.snapshot().nodes] == ["online"], 20, message="node still online")
