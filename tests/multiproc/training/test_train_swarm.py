"""A real swarm on loopback (coordinator + 3 node processes) trains through `swarm train`.

One swarm runs two jobs: `none` must reproduce single-process training over its steps, and
`aqsgd:fw=2,bw=4` must reproduce the single-process simulated boundary; both must learn, and
the exported checkpoint must load in `transformers`.
"""

import json
import math

import pytest
import torch

from swarm.cli import main as swarm_main
from tests.helpers.procs import coordinator_proc, nodes_proc, wait_until
from tests.multiproc.training._common import reference_losses, train_args, write_inputs

pytestmark = pytest.mark.multiproc


def _run_job(capsys, coord, model, data, out, *, codec: str, steps: int) -> dict:
    rc = swarm_main(train_args(coord, model, data, steps=steps, codec=codec, extra=("--out", str(out), "--json")))
    printed = capsys.readouterr().out.strip().splitlines()
    job = json.loads(printed[-1])
    assert rc == 0, job
    assert job["state"] == "succeeded"
    return coord.get_json(f"/api/jobs/{job['id']}")


@pytest.mark.timeout(150)
def test_three_node_job_matches_single_process_and_exports(tmp_path, capsys):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]) as (n0, n1, n2):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 nodes online")
        nodes = (n0, n1, n2)

        job = _run_job(capsys, coord, model, data, tmp_path / "out-none", codec="none", steps=10)
        assert job["plan"]["d_pp"] == 3 and len({a["node_id"] for a in job["assignments"]}) == 3
        losses = [p["loss"] for p in job["progress"]]
        assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
        ref, _ = reference_losses(coord.state_dir, job)
        assert losses == pytest.approx(ref, rel=1e-4, abs=1e-5)
        assert losses[-1] < losses[0] - 0.3  # it learns
        assert job["bytes_sent"] > 0 and job["bytes_saved"] == 0
        # every node counted the pipeline tensors (and probes) it exchanged with its peers
        node_ids = {a["node_id"] for a in job["assignments"]}

        def totals_cover_the_job():
            rows = [n for n in coord.get_json("/api/nodes")["nodes"] if n["id"] in node_ids]
            return (len(rows) == 3 and all((n["bytes_sent"] or 0) > 0 and (n["bytes_received"] or 0) > 0 for n in rows)
                    and sum(n["bytes_sent"] for n in rows) >= job["bytes_sent"])

        wait_until(totals_cover_the_job, 10, message="node traffic totals in /api/nodes cover the job's tensors")

        aq = _run_job(capsys, coord, model, data, tmp_path / "out-aq", codec="aqsgd:fw=2,bw=4", steps=10)
        aq_losses = [p["loss"] for p in aq["progress"]]
        aq_ref, _ = reference_losses(coord.state_dir, aq)
        assert aq_losses == pytest.approx(aq_ref, rel=1e-3, abs=1e-4)
        assert aq_losses[-1] < aq_losses[0] - 0.3
        # second epoch: activations travel as 2-bit changes, gradients as 4 bits
        first, last = aq["progress"][0], aq["progress"][-1]
        assert last["bytes_sent"] < 0.25 * first["bytes_sent"] and aq["bytes_saved"] > aq["bytes_sent"]

        # swarm jobs / job / cancel: a long job is cancelled and its nodes stop and become free
        assert swarm_main(train_args(coord, model, data, steps=100_000, extra=("--json",))) == 0
        long_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["id"]
        wait_until(lambda: coord.get_json(f"/api/jobs/{long_id}")["step"] is not None, 30, message="long job runs")
        assert swarm_main(["cancel", long_id, "--coordinator", coord.address, "--json"]) == 2  # no token
        assert "token" in capsys.readouterr().err
        assert swarm_main(["cancel", long_id, "--coordinator", coord.address, "--token", coord.admin_token, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
        assert swarm_main(["jobs", "--coordinator", coord.address, "--token", coord.read_token, "--json"]) == 0
        states = {j["id"]: j["state"] for j in json.loads(capsys.readouterr().out)["jobs"]}
        assert states == {job["id"]: "succeeded", aq["id"]: "succeeded", long_id: "cancelled"}
        assert swarm_main(["job", job["id"], "--coordinator", coord.address, "--token", coord.read_token]) == 0
        assert "succeeded" in capsys.readouterr().out
        for n in nodes:  # every stage worker of the cancelled job stops
            wait_until(lambda n=n: f"stopping stage worker job={long_id}" in n.proc.log_tail(500_000), 20,
                       message=f"{n.state_dir.name} stops its worker")

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out-none")
    from swarm.model.checkpoint import load_checkpoint

    ours = load_checkpoint(tmp_path / "out-none")
    ids = torch.arange(12).view(1, 12) % ours.config.vocab_size
    from swarm.model.stage import StageModel

    stage = StageModel(ours.config, 0, ours.config.num_layers, is_first=True, is_last=True)
    stage.load_hf_state(ours.tensors)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, stage(ids), atol=1e-4)
