"""Trust but verify, end to end: a node that corrupts what it sends is caught by spot checks,
quarantined, and the job re-plans without it and still converges (coordinator + 4 nodes)."""

import json

import pytest

from swarm.cli import main as swarm_main
from swarm.localswarm import child_env, start_node
from tests.helpers.procs import FAST_NODE_ARGS, NodeHandle, coordinator_proc, node_proc, wait_until
from tests.multiproc.training._common import reference_losses, train_args, write_inputs

pytestmark = pytest.mark.multiproc


def faulty_node(coord, state_dir, fault: str) -> NodeHandle:
    proc, ready = start_node(coord.address, coord.token, state_dir, name=state_dir.name, extra_args=FAST_NODE_ARGS,
                             env=child_env({"SWARM_FAULT": fault}))
    return NodeHandle(proc=proc, state_dir=state_dir, port=int(ready["port"]), node_id=ready["node_id"])


@pytest.mark.xfail(reason="unfinished (issue 13): replica weights drift after failed hivemind rounds, so an honest "
                          "replica can look wrong and is quarantined too; see docs/security.md 'Verification'",
                   strict=False)
@pytest.mark.timeout(240)
def test_corrupting_node_is_quarantined_and_the_job_still_converges(tmp_path, capsys):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0"), \
            node_proc(coord, tmp_path / "n1"), node_proc(coord, tmp_path / "n2"):
        bad = faulty_node(coord, tmp_path / "bad", "corrupt-activations=0.2")
        try:
            wait_until(lambda: sum(n.state == "online" and bool(n.measured_tflops) for n in coord.snapshot().nodes) == 4,
                       60, message="4 nodes online and measured")
            # verify-prob 0.5 here so that CI catches it in a few steps; the default is 0.02
            rc = swarm_main(train_args(coord, model, data, steps=40, stages=2, replicas=2,
                                       extra=("--checkpoint-every", "4", "--verify-prob", "0.5", "--follow", "--json")))
            job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            job = coord.get_json(f"/api/jobs/{job['id']}")
            nodes = {n["id"]: n for n in coord.get_json("/api/nodes")["nodes"]}
        finally:
            bad.proc.stop()
    assert rc == 0 and job["state"] == "succeeded", job["reason"]
    assert nodes[bad.node_id]["state"] == "quarantined", nodes[bad.node_id]
    assert "spot check" in nodes[bad.node_id]["quarantine_reason"]
    assert job["attempt"] == 2 and bad.node_id not in {a["node_id"] for a in job["assignments"]}
    first_bad = job["resume_step"]
    assert first_bad < 100
    losses = [p["loss"] for p in job["progress"]]
    ref, _ = reference_losses(coord.state_dir, job)
    assert abs(losses[-1] - ref[-1]) < 0.05, (losses[-1], ref[-1])
