"""bench/chaos.py --quick: a 2 x 2 job once without faults, once with a replica SIGKILLed and the
coordinator SIGKILLed and restarted; the churn run commits every step once."""

import json

import pytest

from bench import chaos

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(600)
def test_chaos_quick_commits_every_step_once(capsys):
    rc = chaos.main(["--quick", "--no-record", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    base, churn = out["runs"]
    assert rc == 0 and base["state"] == churn["state"] == "succeeded"
    assert churn["steps"] == base["steps"] == 100
    assert churn["repeated_steps"] == []  # a replica drop and a coordinator restart roll nothing back
    assert [f["what"].split()[0] for f in churn["faults"]] == ["node", "coordinator"]
    assert all(f["next_commit_s"] is not None and f["next_commit_s"] < 30 for f in churn["faults"])
