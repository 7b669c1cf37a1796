"""Churn during training: the coordinator restarts mid-job, a stage is lost with no spare (the job
waits, then resumes when the node comes back), a replica is lost (the survivors carry on without
rollback). Real coordinator and node processes."""

import pytest

from swarm.cli.train import upload_files
from swarm.compression import CodecSpec
from swarm.job_spec import JobSpec
from swarm.transport.coordinator_client import CoordinatorClient
from tests.helpers.procs import (FAST_COORDINATOR_ARGS, coordinator_proc, launch_coordinator, launch_node, node_proc,
                                 nodes_proc, wait_until)
from tests.multiproc.training._common import write_inputs

pytestmark = pytest.mark.multiproc


def _spec(steps: int, *, stages: int, replicas: int) -> JobSpec:
    return JobSpec(steps=steps, batch_size=4, micro_batch_size=2, seq_len=16, lr=1e-3, codec=CodecSpec.parse("none"),
                   checkpoint_every=5, num_stages=stages, num_replicas=replicas, peer_timeout_s=20.0)


def _kinds(detail) -> list[str]:
    return [e["kind"] for e in detail["events"]]


# long enough that the nodes, which train on through the outage (~30 steps/s here), are still
# running when the stage node is killed after the coordinator is back
STEPS = 1000
# more than the test runs (it cancels the job once the grown plan committed steps)
GROW_STEPS = 100_000


@pytest.mark.timeout(240)
def test_coordinator_restart_then_lost_stage_waits_for_its_node_and_resumes(tmp_path):
    model, data = write_inputs(tmp_path)
    coord = None
    with coordinator_proc(tmp_path / "coord") as first, node_proc(first, tmp_path / "n0") as n0, \
            node_proc(first, tmp_path / "n1") as n1:
        wait_until(lambda: sum(n.state == "online" for n in first.snapshot().nodes) == 2, 30, message="2 nodes online")
        with CoordinatorClient(first.address, token=first.admin_token) as client:
            job_id = client.submit_job(_spec(STEPS, stages=2, replicas=1), upload_files(model, data)).id
        detail = lambda: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        coord = first
        wait_until(lambda: (detail()["step"] or 0) >= 10, 60, message="training runs")

        # 1. SIGKILL the coordinator mid-job and start it again on the same ports and state dir
        down_step = detail()["step"]
        first.proc.kill()
        coord = launch_coordinator(first.state_dir, port=first.port, http_port=first.http_port)
        try:
            wait_until(lambda: "coordinator_reconnect" in _kinds(detail()), 30, message="the nodes reconnect")
            d = detail()
            assert d["state"] == "running" and d["attempt"] == 1, d["reason"]  # no re-plan: nothing was lost
            assert _kinds(d).index("coordinator_restart") < _kinds(d).index("coordinator_reconnect")
            wait_until(lambda: (detail()["step"] or 0) >= down_step + 20, 60, message="training goes on")

            # 2. kill the stage-1 node: with no spare the job waits for a node instead of failing
            victim = next(a["node_id"] for a in detail()["assignments"] if a["stage"] == 1)
            handle = {n0.node_id: n0, n1.node_id: n1}[victim]
            handle.proc.kill()
            waiting = wait_until(lambda: (d := detail())["state"] == "pending" and d, 30, message="the job waits")
            assert "waiting for a node" in waiting["reason"] and "--node-wait-s" in waiting["reason"]
            resume = waiting["resume_step"]
            assert resume >= 5 and resume % 5 == 0
            # 3. the node comes back (same state dir, same id): the job resumes from its checkpoint
            with node_proc(coord, handle.state_dir) as back:
                assert back.node_id == victim
                done = wait_until(lambda: (d := detail())["state"] in ("succeeded", "failed") and d, 150,
                                  message="the job ends")
            assert done["state"] == "succeeded", done["reason"]
            steps = [p["step"] for p in done["progress"]]
            assert steps == list(range(STEPS))  # no committed step lost across the restart and the wait
            # the steps between the checkpoint and the kill are done again (a rollback to the
            # checkpoint); nothing before the checkpoint is
            assert all(s >= resume for s in done["repeated_steps"])
            kinds = _kinds(done)
            assert kinds.index("node_lost") < kinds.index("replan") < kinds.index("resumed")
            assert next(e for e in done["events"] if e["kind"] == "replan")["fields"]["waiting"] is True
        finally:
            coord.proc.stop()


@pytest.mark.timeout(200)
def test_losing_one_replica_the_survivors_carry_on_and_it_is_added_back_when_it_returns(tmp_path):
    """Issue 14 item 2: a lost replica is dropped without rollback; when its node comes back (same
    state dir) the job grows back to --replicas 2 at a step boundary, again without rollback, the
    new replica copying its state from a live one."""
    model, data = write_inputs(tmp_path)
    # a node is lost after 6 s without a heartbeat (not 3): the restarted node's heartbeats lag
    # while it loads torch and hivemind for its new worker on a loaded 2-core box, and a loss
    # in the middle of the growth fence would roll the job back to a checkpoint
    args = [*FAST_COORDINATOR_ARGS, "--node-timeout-s", "6"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(4)]) as (n0, n1, n2, n3):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 4, 30, message="4 nodes online")
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(_spec(GROW_STEPS, stages=2, replicas=2), upload_files(model, data)).id
        detail = lambda: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        wait_until(lambda: (detail()["step"] or 0) >= 8, 60, message="training runs")
        d = detail()
        assert d["plan"]["d_dp"] == 2
        # replica 0's stage 1: the pipeline whose checkpoints the coordinator usually keeps
        victim = next(a["node_id"] for a in d["assignments"] if a["stage"] == 1 and a["replica"] == 0)
        handles = {h.node_id: h for h in (n0, n1, n2, n3)}
        before = d["step"]
        handles[victim].proc.kill()
        # the next committed step: reported by every worker of the (new) plan. How soon it comes
        # (the issue asks within 15 s) is bench/chaos.py's figure; a loaded CI box only shows it comes
        # (steps the victim had already reported before it died may still commit: wait for the
        # fence's re-plan and a step committed after its switch step)
        def carried_on():
            d = detail()
            replan = next((e for e in d["events"] if e["kind"] == "replan"), None)
            return (replan is not None and d["step"] is not None and d["step"] >= replan["fields"]["resume_step"]
                    and d["step"] > before and d)

        after = wait_until(carried_on, 45, message="a re-plan and a committed step after the kill")
        kinds = _kinds(after)
        assert "replica_dropped" in kinds, kinds
        replan = next(e for e in after["events"] if e["kind"] == "replan")
        assert replan["fields"]["fence"] is True and replan["fields"]["num_replicas"] == 1
        assert after["plan"]["d_dp"] == 1 and victim not in {a["node_id"] for a in after["assignments"]}
        # the node comes back with its state dir: an idle pipeline's worth of nodes again
        back = launch_node(coord, handles[victim].state_dir)
        try:
            assert back.node_id == victim
            grown = wait_until(lambda: "replica_added" in _kinds(d := detail()) and d["plan"]["d_dp"] == 2 and d, 90,
                               message="the job grows back to 2 replicas")
            added = next(e for e in grown["events"] if e["kind"] == "replica_added")
            assert added["fields"]["num_replicas"] == 2 and added["fields"]["added"], added
            # the new replicas copied weights + AdamW state from the live ones, peer to peer, hash-checked
            assert added["fields"]["state_from"] == "peer" and added["fields"]["state_bytes"] > 0, added
            assert {a["node_id"] for a in grown["assignments"]} == set(handles), grown["assignments"]
            # steps committed by the grown plan (every one of its 4 workers reported them)
            wait_until(lambda: (detail()["step"] or 0) >= grown["step"] + 10, 90,
                       message="10 steps committed with 2 replicas again")
            with CoordinatorClient(coord.address, token=coord.admin_token) as client:
                client.cancel_job(job_id)  # the rest of the job is plain training, covered elsewhere
            done = wait_until(lambda: (d := detail())["state"] == "cancelled" and d, 30, message="job cancelled")
        finally:
            back.proc.stop()
        steps = [p["step"] for p in done["progress"]]
        assert steps == list(range(len(steps))) and len(steps) > grown["step"] + 10, steps
        # no rollback, neither when dropping nor when adding
        assert done["repeated_steps"] == [], [(e["kind"], e["message"]) for e in done["events"]]
        kinds = _kinds(done)
        assert kinds.index("node_lost") < kinds.index("replica_dropped") < kinds.index("replica_added"), kinds


@pytest.mark.timeout(200)
def test_losing_one_of_three_replicas_the_survivors_merge_what_they_learnt_alone(tmp_path):
    """Issue 14 item 2 with 3 replicas: until the coordinator notices the loss (the node timeout)
    and through the fence, each surviving pipeline steps with its own gradients (a round with the
    dead member fails). At the switch step the two survivors average their parameters (a round of
    the live members only: node/training/worker.py ``_merge_survivors``), so both upload the same
    weights and the re-plan, which resumes from one of them, keeps what both learnt."""
    from safetensors.torch import load_file

    model, data = write_inputs(tmp_path)
    args = [*FAST_COORDINATOR_ARGS, "--node-timeout-s", "6"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, \
            nodes_proc(coord, [tmp_path / f"n{i}" for i in range(3)]) as (n0, n1, n2):
        wait_until(lambda: sum(n.state == "online" for n in coord.snapshot().nodes) == 3, 30, message="3 nodes online")
        spec = JobSpec(steps=GROW_STEPS, batch_size=12, micro_batch_size=2, seq_len=16, lr=1e-3,
                       codec=CodecSpec.parse("none"), checkpoint_every=5, num_stages=1, num_replicas=3,
                       peer_timeout_s=20.0)
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(spec, upload_files(model, data)).id
        detail = lambda: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        wait_until(lambda: (detail()["step"] or 0) >= 8, 60, message="training runs")
        d = detail()
        assert d["plan"]["d_dp"] == 3, d["plan"]
        victim = next(a["node_id"] for a in d["assignments"] if a["replica"] == 1)
        {h.node_id: h for h in (n0, n1, n2)}[victim].proc.kill()
        replanned = wait_until(lambda: "replan" in _kinds(d := detail()) and d, 60, message="the fence's re-plan")
        replan = next(e for e in replanned["events"] if e["kind"] == "replan")
        assert replan["fields"]["fence"] is True and replan["fields"]["num_replicas"] == 2, replan
        switch = replan["fields"]["resume_step"]
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            client.cancel_job(job_id)  # what follows is plain 2-replica training, covered elsewhere
        wait_until(lambda: detail()["state"] == "cancelled", 30, message="job cancelled")
    assert replanned["repeated_steps"] == []  # no rollback
    step_dir = tmp_path / "coord" / "jobs" / job_id / "checkpoints" / f"step-{switch:08d}"
    uploads = {r: load_file(str(step_dir / f"stage-0-r{r}" / "weights.safetensors")) for r in (0, 2)}
    assert uploads[0].keys() == uploads[2].keys()
    # merged: the same weights up to the fp16 rounding of the round (~1e-4 relative); unmerged,
    # the survivors stood 7e-2 apart here (the node timeout's worth of steps each took alone)
    num = sum(float((uploads[0][k].float() - uploads[2][k].float()).norm() ** 2) for k in uploads[0]) ** 0.5
    den = sum(float(uploads[0][k].float().norm() ** 2) for k in uploads[0]) ** 0.5
    assert num / den < 1e-3, f"the survivors' uploads at the switch step {switch} are {num / den:.2e} apart"
    logs = "".join((tmp_path / f"n{i}.log").read_text() for i in range(3))
    assert logs.count("fence: merged the parameters of 2 live replicas") == 2, logs[-3000:]
