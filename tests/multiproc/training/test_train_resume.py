"""Issue 12 items 1 and 2 on a real swarm (coordinator + 3 node processes).

A shape the swarm cannot hold is refused at submission, naming the flag, and leaves no job
behind. A job cancelled after a checkpoint can be downloaded (`swarm job ID --download DIR`,
loaded by `transformers`) and resumed (`swarm train --resume ID`): the resumed job starts at the
checkpoint step with the optimizer state and data position, so with `none` and the same seed
its losses are those of one run straight through (the single-process reference).
"""

import json

import pytest
import torch

from swarm.cli import main as swarm_main
from tests.helpers.procs import coordinator_proc, nodes_proc, wait_until
from tests.multiproc.training._common import reference_losses, train_args, write_inputs

pytestmark = pytest.mark.multiproc

STEPS = 40


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_bad_shape_is_refused_and_a_cancelled_job_downloads_and_resumes_exactly(tmp_path, capsys):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 nodes online")
        flags = ["--coordinator", coord.address, "--token", coord.admin_token]

        # item 1: more stages / replicas than nodes -> a clean error, no job left behind
        for flag, stages, replicas in (("--stages", 4, 0), ("--replicas", 0, 4), ("--stages", 4, 1)):
            assert swarm_main(train_args(coord, model, data, steps=STEPS, stages=stages, replicas=replicas)) == 2
            err = capsys.readouterr().err
            assert f"{flag} 4" in err and "needs at least 4 nodes but the swarm has 3 online" in err, err
            assert f"lower {flag}" in err
            assert "IndexError" not in err and "internal error" not in err
        assert swarm_main(train_args(coord, model, data, steps=STEPS, stages=5)) == 2  # (unit tests: > layers)
        assert "--stages 5 --replicas 1 needs at least 5 nodes" in capsys.readouterr().err
        assert coord.get_json("/api/jobs")["jobs"] == []

        # a valid job runs; cancel it once a checkpoint is complete
        assert swarm_main(train_args(coord, model, data, steps=STEPS, extra=("--checkpoint-every", "3", "--json"))) == 0
        a_id = _last_json(capsys)["id"]
        detail = lambda job_id: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        wait_until(lambda: (detail(a_id)["last_complete_checkpoint"] or 0) >= 3, 60, interval_s=0.05,
                   message="a complete checkpoint")
        assert swarm_main(["cancel", a_id, *flags]) == 0
        capsys.readouterr()
        a = wait_until(lambda: (d := detail(a_id))["state"] == "cancelled" and d, 10, message="job cancelled")
        k = a["last_complete_checkpoint"]
        assert 3 <= k < STEPS, "the job ended before it could be cancelled: raise STEPS"
        assert "cancelled" in [e["kind"] for e in a["events"]]

        # item 2: download the cancelled job's checkpoint; transformers loads it
        out = tmp_path / "downloaded"
        assert swarm_main(["job", a_id, *flags, "--download", str(out)]) == 0
        assert f"checkpoint of step {k}" in capsys.readouterr().out
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out)
        assert not (out / "optimizer.safetensors").exists()
        with torch.no_grad():
            assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()

        # resume: same spec, from step k, with the optimizer state; runs to the end
        assert swarm_main(["train", *flags, "--resume", a_id, "--follow", "--json"]) == 0
        b = detail(_last_json(capsys)["id"])
        assert b["state"] == "succeeded", b["reason"]
        assert b["resumed_from"] == {"job_id": a_id, "step": k}
        assert b["spec"] == a["spec"] and b["total_steps"] == STEPS
        assert [p["step"] for p in b["progress"]] == list(range(k, STEPS))
        kinds = [e["kind"] for e in b["events"]]
        assert kinds[:2] == ["submitted", "planned"] and "resumed" in kinds and kinds[-1] == "succeeded"
        assert "with its optimizer state" in b["events"][0]["message"]

        # one straight run (the reference trainer) gives the same losses: before k from the
        # cancelled job, from k on from the resumed one (a restarted AdamW would not match)
        ref, _ = reference_losses(coord.state_dir, a)
        a_losses = {p["step"]: p["loss"] for p in a["progress"]}
        assert [a_losses[s] for s in range(k)] == pytest.approx(ref[:k], rel=1e-4, abs=1e-5)
        b_losses = [p["loss"] for p in b["progress"]]
        assert b_losses == pytest.approx(ref[k:], rel=1e-4, abs=1e-5)
        if k in a_losses:  # the cancelled job got past its checkpoint: the same step, the same loss
            assert b_losses[0] == pytest.approx(a_losses[k], rel=1e-4, abs=1e-5)

        # --resume refuses a change of the data's shape, naming the flag
        assert swarm_main(["train", *flags, "--resume", a_id, "--seq-len", "8"]) == 2
        assert "--seq-len 8 differs" in capsys.readouterr().err
