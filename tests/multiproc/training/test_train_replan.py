"""A job that loses a node while an idle node is available is re-planned and resumes from its
last complete checkpoint, then finishes (coordinator + 3 node processes, 2 of them used)."""

import io

import pytest

from swarm.cli.follow import follow
from swarm.cli.train import upload_files
from swarm.compression import CodecSpec
from swarm.job_spec import JobSpec
from swarm.transport.coordinator_client import CoordinatorClient
from tests.helpers.procs import coordinator_proc, nodes_proc, wait_until
from tests.multiproc.training._common import write_inputs

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(120)
def test_lost_node_is_replaced_and_the_job_resumes_from_its_checkpoint(tmp_path):
    model, data = write_inputs(tmp_path)
    spec = JobSpec(steps=150, batch_size=4, micro_batch_size=2, seq_len=16, lr=1e-3, codec=CodecSpec.parse("none"),
                   checkpoint_every=3, num_stages=2, num_replicas=1, peer_timeout_s=5.0)
    with coordinator_proc(tmp_path / "coord") as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]) as (n0, n1, n2):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 nodes online")
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(spec, upload_files(model, data)).id
        detail = lambda: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        wait_until(lambda: (detail()["last_complete_checkpoint"] or 0) >= 3, 60, message="a complete checkpoint")
        first = detail()
        used = {a["node_id"] for a in first["assignments"]}
        handles = {h.node_id: h for h in (n0, n1, n2)}
        (idle,) = set(handles) - used
        victim = next(a["node_id"] for a in first["assignments"] if a["stage"] == 1)
        handles[victim].proc.kill()

        replanned = wait_until(lambda: (d := detail())["attempt"] == 2 and d, 30, message="the job is re-planned")
        assert replanned["state"] == "running" and "resuming from step" in replanned["reason"]
        assert replanned["resume_step"] >= 3
        assert idle in {a["node_id"] for a in replanned["assignments"]}
        assert victim not in {a["node_id"] for a in replanned["assignments"]}
        done = wait_until(lambda: (d := detail())["state"] in ("succeeded", "failed") and d, 90, message="job ends")
        assert done["state"] == "succeeded", done["reason"]
        steps = [p["step"] for p in done["progress"]]
        assert steps == list(range(150))  # earlier steps from attempt 1, the rest from attempt 2
        assert {p["attempt"] for p in done["progress"] if p["step"] >= replanned["resume_step"]} == {2}
        losses = [p["loss"] for p in done["progress"]]
        assert losses[-1] < losses[0]
        # the events tell the story: lost node, re-plan (with the resume step), resumed, done
        events = done["events"]
        kinds = [e["kind"] for e in events]
        assert kinds[:2] == ["submitted", "planned"] and kinds[-1] == "succeeded", kinds
        lost = next(e for e in events if e["kind"] == "node_lost")
        assert lost["fields"]["node"] == victim and lost["fields"]["stage"] == 1
        replan = next(e for e in events if e["kind"] == "replan")
        # a stage lost with no replica to carry on: a rollback by design (coordinator/jobs/churn.py)
        assert replan["fields"] == {"attempt": 2, "resume_step": replanned["resume_step"], "cause": "stage_lost"}
        assert "with its optimizer state" in replan["message"]
        assert kinds.index("node_lost") < kinds.index("replan") < kinds.index("resumed")
        assert next(e for e in events if e["kind"] == "resumed")["fields"]["step"] == replanned["resume_step"]
        # and the follow loop prints them, one line each
        out = io.StringIO()
        with CoordinatorClient(coord.address, token=coord.read_token) as client:
            follow(client, job_id, quiet=False, out=out)
        printed = out.getvalue()
        assert f"! node {victim[:12]} (stage 1, replica 0) is lost" in printed
        assert f"resuming from step {replanned['resume_step']}" in printed
