"""A node slowed in fact (``SWARM_FAULT=slowdown=10``: every forward and backward takes 10x its
compute time) is seen slow by its neighbour: the job records a ``slow_node`` event naming it,
with the figures, shown in ``swarm status --json`` (``slow_reason``), and its running estimate
(``measured_tflops``) drops below what it claims (issue 13 item 1; coordinator/jobs/speed.py)."""

from __future__ import annotations

import pytest

from swarm.cli.status import status_json
from swarm.cli.train import upload_files
from swarm.compression import CodecSpec
from swarm.job_spec import JobSpec
from swarm.transport.coordinator_client import CoordinatorClient
from tests.helpers.procs import FAST_COORDINATOR_ARGS, coordinator_proc, node_proc, wait_until
from tests.multiproc.training._common import TEXT

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(180)
def test_a_slowed_node_is_reported_slow_by_its_neighbour(tmp_path):
    from swarm.model.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "model", num_layers=4, hidden_size=64, num_heads=4, max_position_embeddings=64)
    (tmp_path / "data.txt").write_text(TEXT * 8)
    args = [*FAST_COORDINATOR_ARGS, "--node-timeout-s", "20"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, node_proc(coord, tmp_path / "fast") as f, \
            node_proc(coord, tmp_path / "slow", env={"SWARM_FAULT": "slowdown=10"}) as s:
        wait_until(lambda: sum(n["state"] == "online" for n in coord.get_json("/api/nodes")["nodes"]) == 2, 60,
                   message="both nodes online")
        spec = JobSpec(steps=400, batch_size=8, micro_batch_size=2, seq_len=32, lr=1e-3, codec=CodecSpec.parse("none"),
                       checkpoint_every=0, num_stages=2, num_replicas=1, peer_timeout_s=30.0, node_wait_s=0.0)
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(spec, upload_files(tmp_path / "model", tmp_path / "data.txt")).id

            def slow_events():
                return [e for e in coord.get_json(f"/api/jobs/{job_id}")["events"] if e["kind"] == "slow_node"]

            wait_until(lambda: slow_events(), 90, message="a slow_node event")
            status = {n["id"]: n for n in status_json(client.snapshot())["nodes"]}  # swarm status --json
            client.cancel_job(job_id)
        ev = slow_events()
        assert [e["fields"]["node_id"] for e in ev] == [s.node_id], ev
        assert ev[0]["fields"]["relative_speed"] < 0.5 and ev[0]["fields"]["seen_tflops"] > 0, ev
        slow, fast = status[s.node_id], status[f.node_id]
        assert "planned speed" in slow["slow_reason"] and not fast["slow_reason"], (slow, fast)
        assert slow["measured_tflops"] < slow["tflops"], slow  # its running estimate, from what was seen
