"""bench/chaos.py --quick: a 2 x 2 job once without faults, once with the coordinator SIGKILLed and
restarted and then a replica SIGKILLed; the churn run commits every step once."""

import json
import os

import pytest

from bench import chaos

# Out of the default run: CI must not be flaky. On 2026-11-30 (this 2-core machine, load 5-8 from
# other work) it passed 2 of 3 runs (~75 s each); the third run's replica-loss fence did not stop
# the surviving pipeline, which finished the job on its own (replica 1 uploads no weights), so the
# job rolled back to its last checkpoint 60 s later and failed assembling the result. Earlier
# failures: a worker set-up call failing on the coordinator outage (fixed: retried), a node killed
# and restarted before its loss was noticed (stalled until quarantined; now dropped as "restarted",
# tests/unit/training/test_restarted_worker.py; --quick brings the node back later anyway). Run it
# with SWARM_CHAOS_TEST=1 (the churn guarantees themselves are in test_train_churn.py).
pytestmark = [pytest.mark.multiproc,
              pytest.mark.skipif(os.environ.get("SWARM_CHAOS_TEST") != "1",
                                 reason="bench/chaos.py --quick: set SWARM_CHAOS_TEST=1 (not yet reliable on 2 cores)")]


@pytest.mark.timeout(600)
def test_chaos_quick_commits_every_step_once(capsys):
    rc = chaos.main(["--quick", "--no-record", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    base, churn = out["runs"]
    assert rc == 0 and base["state"] == churn["state"] == "succeeded", (base["state"], base.get("reason"),
                                                                          churn["state"], churn.get("reason"))
    assert churn["steps"] == base["steps"] == out["steps"]
    assert churn["repeated_steps"] == []  # a replica drop and a coordinator restart roll nothing back
    assert out["coordinator_killed"]  # while the job ran
    assert [f["what"].split()[0] for f in churn["faults"]] == ["coordinator", "node"]
    # a fault after the last step was committed (the job outran it) has no next committed step
    assert all(f["next_commit_s"] is not None and f["next_commit_s"] < 30 for f in churn["faults"]
               if f["step_before"] < out["steps"] - 1), churn["faults"]
