"""Trust but verify, end to end: honest 2 x 2 training with spot checks on (every micro-batch
sampled) finishes with nobody quarantined, whether or not the replicas' averaging rounds succeed
(coordinator + 4 node processes), and most checks are weighed: replicas are compared by their
parameter sketches and re-synchronised every 20 steps (docs/security.md "Verification"; before
that, 4 of 80 comparisons were weighed in this test).

Catching a corrupting node on real processes: tests/multiproc/training/test_train_spotcheck_faults.py;
in-process, deterministically: tests/unit/foundation/test_spotcheck_digest.py."""

import json
import re

import pytest

from swarm.cli import main as swarm_main
from tests.helpers.procs import coordinator_proc, nodes_proc, wait_until
from tests.multiproc.training._common import train_args, write_inputs

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(300)
# aqsgd at its coarsest rounding: the checker replays the AQ-SGD sender (forward, exact) and allows
# one stochastic rounding's error on the 4-bit gradients (swarm/compression/replay.py)
@pytest.mark.parametrize("codec", ["none", "aqsgd:fw=2,bw=4"])
def test_honest_replicas_with_spot_checks_finish_and_nobody_is_quarantined(tmp_path, capsys, codec):
    model, data = write_inputs(tmp_path)
    with coordinator_proc(tmp_path / "coord") as coord, nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)]):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 4, 60, message="4 nodes online")
        # --verify-prob 1: every micro-batch of every stage is recomputed by its replica
        rc = swarm_main(train_args(coord, model, data, steps=20, stages=2, replicas=2, codec=codec,
                                   extra=("--checkpoint-every", "5", "--verify-prob", "1", "--follow", "--json")))
        job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        job = coord.get_json(f"/api/jobs/{job['id']}")
        nodes = coord.get_json("/api/nodes")["nodes"]
    assert rc == 0 and job["state"] == "succeeded", job["reason"]
    assert [n["state"] for n in nodes] == ["online"] * 4 or all(n["state"] != "quarantined" for n in nodes), nodes
    assert not [e for e in job["events"] if e["kind"] == "quarantined"], job["events"]
    assert job["attempt"] == 1 and job["spec"]["verify_prob"] == 1.0
    # the checks did run (each checker logs every comparison it makes)
    logs = "".join((tmp_path / f"n{i}.log").read_text() for i in range(4))
    num_checks = len(re.findall(r"spot check job=\S+ stage=\d+ replica=\d+ step=\d+ micro_batch=\d+ \w+ error=", logs))
    assert num_checks >= 20, num_checks
    # and most are weighed: replicas stay within SYNC_TOLERANCE (param sketches; re-sync every 5 steps)
    stats = job["spot_checks"]
    print("spot checks:", stats)
    assert stats["weighed"] >= stats["checks"] // 2 and stats["mismatches"] == 0, stats
    # every witness copy is, bit for bit, what the checked node committed to having computed on
    # or sent (node/training/commitments.py): both ends of a boundary see the same tensors
    assert stats["contested"] == 0 and stats["bound"] == stats["weighed"], stats
    if codec != "none":  # compressed boundaries are checked too: outputs and gradients alike
        kinds = set(re.findall(r"spot check job=\S+ stage=\d+ replica=\d+ step=\d+ micro_batch=\d+ (\w+) error=", logs))
        assert kinds == {"output", "grad_in"}, kinds
