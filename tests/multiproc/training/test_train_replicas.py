"""Two replicas of one stage average their gradients through hivemind (two node processes)."""

import json

import pytest
import torch

from swarm.cli import main as swarm_main
from swarm.model.checkpoint import load_checkpoint
from tests.helpers.procs import coordinator_proc, node_proc, wait_until
from tests.multiproc.training._common import reference_losses, train_args, write_inputs

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(120)
def test_two_replicas_average_gradients_through_hivemind(tmp_path, capsys):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, node_proc(coord, tmp_path / "n0"), \
            node_proc(coord, tmp_path / "n1"):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 2, 30, message="2 nodes online")
        rc = swarm_main(train_args(coord, model, data, steps=8, stages=1, replicas=2,
                                   extra=("--out", str(tmp_path / "out"), "--json")))
        job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 0 and job["state"] == "succeeded", job
        job = coord.get_json(f"/api/jobs/{job['id']}")
    assert job["plan"]["d_dp"] == 2 and job["plan"]["d_pp"] == 1
    losses = [p["loss"] for p in job["progress"]]
    # The reference averages both replicas' gradients exactly; hivemind sends them as float16.
    ref, stages = reference_losses(coord.state_dir, job)
    assert losses == pytest.approx(ref, rel=2e-3, abs=2e-3)
    # The exported weights (replica 0) equal the averaged reference, not what replica 0 alone
    # would have learnt from its half of each batch.
    ours = load_checkpoint(tmp_path / "out").tensors
    theirs = stages[0].hf_state_dict()
    init = load_checkpoint(coord.state_dir / "jobs" / job["id"] / "init").tensors
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
    moved = norm({k: theirs[k] - init[k] for k in theirs})
    diff = norm({k: ours[k] - theirs[k] for k in theirs})
    assert moved > 0.1 and diff < 0.2 * moved, (diff, moved)
    assert torch.isfinite(torch.tensor(losses)).all()
