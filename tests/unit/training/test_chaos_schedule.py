"""bench/chaos.py's fault schedule: the churn run's faults strike by its own progress, so every one
of them fires while the job runs, however fast the churn run goes."""

import pytest

from bench.chaos import Fault, fault_due, fault_steps

pytestmark = pytest.mark.timeout(10)


def test_faults_spread_evenly_through_the_job():
    steps = fault_steps(579, 10)
    assert steps == [53, 105, 158, 211, 263, 316, 368, 421, 474, 526]
    assert len(set(steps)) == 10 and steps[-1] < 578  # each after its own step, none at the last


def test_a_short_job_still_holds_every_fault_before_its_last_step():
    for total in range(14, 40):
        steps = fault_steps(total, 10)
        assert steps == sorted(set(steps)) and steps[0] >= 3 and steps[-1] <= total - 2, (total, steps)


def test_too_short_a_job_says_what_to_do():
    with pytest.raises(ValueError, match="--steps of at least 14"):
        fault_steps(13, 10)


def test_triggers():
    assert fault_due(("step", 53), 1.0, 53, None) and not fault_due(("step", 53), 999.0, 52, None)
    assert fault_due(("at_s", 60.0), 60.0, 0, None) and not fault_due(("at_s", 60.0), 59.9, 500, None)
    assert fault_due(("healed", None), 0.0, 2, None) and not fault_due(("healed", None), 0.0, 1, None)
    coordinator = Fault(what="coordinator SIGKILL", at_s=1.0, step_before=5)
    assert not fault_due(("healed", None), 9.0, 5, coordinator)
    coordinator.next_commit_s = 3.0
    assert fault_due(("healed", None), 9.0, 6, coordinator)


def test_a_step_fault_waits_for_the_last_one_to_be_undone():
    last = Fault(what="node n1 SIGKILL", at_s=100.0, step_before=50)
    assert not fault_due(("step", 60), 110.0, 200, last, min_gap_s=30.0)  # the job raced past two thresholds
    assert not fault_due(("step", 60), 140.0, 200, last, down=True, min_gap_s=30.0)  # n1 not started again yet
    assert fault_due(("step", 60), 130.0, 200, last, min_gap_s=30.0)
