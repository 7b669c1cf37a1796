"""Training across network namespaces: three node processes, each behind a veth shaped with
`tc tbf` at 100 Mbit/s, train a job with AQ-SGD; activations and gradients really cross the
shaped links (the nodes' peer addresses are their namespaces' own)."""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.netns


def _netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


@pytest.mark.timeout(150)
@pytest.mark.skipif(not _netns_available(), reason="needs root, ip and tc")
def test_aqsgd_job_trains_across_shaped_namespaces(tmp_path):
    from bench.pipeline_swarm import Swarm
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.job_spec import JobSpec
    from swarm.model.testing import _SAMPLE_TEXT, make_tiny_checkpoint
    from swarm.transport.coordinator_client import CoordinatorClient
    from swarm.localswarm import wait_until

    make_tiny_checkpoint(tmp_path / "model", num_layers=3, hidden_size=32, num_heads=4, max_position_embeddings=64)
    (tmp_path / "data.txt").write_text(_SAMPLE_TEXT * 2)
    swarm = Swarm(tmp_path / "swarm", 3, device="cpu", rate_mbit=100, threads=1)
    try:
        with CoordinatorClient(swarm.local_address, token=swarm.admin_token) as client:
            nodes = client.snapshot().nodes
        assert all(n.peer_address.startswith(swarm.subnet + ".") for n in nodes)
        spec = JobSpec(steps=12, batch_size=8, micro_batch_size=2, seq_len=32, lr=3e-3,
                       codec=CodecSpec.parse("aqsgd:fw=4,bw=8"), num_stages=3, num_replicas=1, peer_timeout_s=30.0)
        with CoordinatorClient(swarm.local_address, token=swarm.admin_token) as client:
            job = client.submit_job(spec, upload_files(tmp_path / "model", tmp_path / "data.txt"))
            job = wait_until(lambda: (j := client.get_job(job.id)).state in ("succeeded", "failed") and j, 100,
                             message="job ends").detail
        assert job["state"] == "succeeded", job["reason"]
        losses = [p["loss"] for p in job["progress"]]
        assert losses[-1] < losses[0]
        assert job["progress"][-1]["bytes_sent"] < job["progress"][0]["bytes_sent"] / 2  # warm AQ-SGD cache
    finally:
        swarm.close()
