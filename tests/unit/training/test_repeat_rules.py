"""Steps done twice, told apart: a rollback's redo (a stage lost without a replica) from work the
fence protocol promises never to repeat (coordinator/jobs/churn.py split_repeats)."""

from coordinator.jobs import churn


def _replan(attempt: int, resume: int, **fields) -> dict:
    return {"kind": "replan", "message": "", "fields": {"attempt": attempt, "resume_step": resume, **fields}}


def test_rollback_attempts_are_the_replans_that_roll_back_by_design():
    events = [{"kind": "planned", "fields": {"attempt": 1}}, _replan(2, 40, fence=True),
              _replan(2, 30, waiting=True, cause="stage_lost"), _replan(3, 30, waited=True),
              _replan(4, 50, cause="wrong_result"), _replan(5, 60, cause="fence_timeout"),
              _replan(6, 60, cause="not_started"), _replan(7, 70, cause="peer_failure"),
              _replan(7, 70, waiting=True, cause="fence_timeout"), _replan(8, 70, waited=True)]
    # a fence that timed out, a failed link, an attempt lost before it started: no redo is by design
    assert churn.rollback_attempts(events) == {3: 30, 4: 50}


def test_a_rollbacks_redo_is_apart_from_a_fences_repeat():
    # attempt 1 ran to step 12, a stage loss rolled back to 10 (attempt 2), which ran to 20; a
    # fence switched at 20 (attempt 3), and attempt 2 had also done step 20 (the bug kind)
    doers = {(10, 0): {1, 2}, (11, 1): {1, 2}, (20, 0): {2, 3}}
    assert churn.split_repeats(doers, {2: 10}) == ([10, 11], [20])


def test_a_redo_before_the_rollbacks_checkpoint_is_not_the_rollbacks():
    # attempt 2 resumed at 10: its step 8 cannot be the rollback's redo
    assert churn.split_repeats({(8, 0): {1, 2}}, {2: 10}) == ([], [8])


def test_the_rollback_may_be_any_attempt_between_the_two_that_did_the_step():
    # attempt 2 (a fence from 15) never reached step 12; attempt 3 rolled back to 10 and redid it
    assert churn.split_repeats({(12, 0): {1, 3}}, {3: 10}) == ([12], [])
    # three attempts: 1 -> 2 is a rollback's redo, 2 -> 3 (a fence) is not: done twice
    assert churn.split_repeats({(12, 0): {1, 2, 3}}, {2: 10}) == ([], [12])


def test_a_step_counts_as_done_twice_if_any_stage_repeated_it_outside_a_rollback():
    assert churn.split_repeats({(12, 0): {1, 2}, (12, 1): {2, 3}}, {2: 10}) == ([], [12])


def test_the_store_names_the_attempts_of_each_step_done_twice(tmp_path):
    from swarm.clock import FakeClock
    from swarm.job_spec import JobSpec

    from coordinator.jobs.store import JobStore
    from coordinator.store import Database

    store = JobStore(Database(tmp_path), FakeClock())
    store.create(job_id="j1", spec=JobSpec(), model={}, num_samples=4, dataset_key="k", total_steps=30)
    for attempt, stage, replica, step in [(1, 0, 0, 10), (1, 0, 1, 10), (2, 0, 0, 10), (1, 1, 0, 10), (1, 0, 0, 11),
                                          (3, 0, 0, 11), (2, 1, 0, 12)]:
        store.add_progress("j1", attempt=attempt, stage=stage, replica=replica, step=step, loss=None, tokens=1,
                           tokens_per_s=1.0, bytes_sent=0, bytes_raw=0, step_s=1.0, compute_s=0.0, wait_s=0.0,
                           comm_s=0.0)
    assert store.repeat_attempts("j1") == {(10, 0): {1, 2}, (11, 0): {1, 3}}
    assert store.repeated_steps("j1") == [10, 11]
