"""A node slowed in fact (``SWARM_FAULT=slowdown=10``: every forward and backward takes 10x its
compute time) is seen slow by its neighbour: the job records a ``slow_node`` event naming it,
with the figures, shown in ``swarm status --json`` (``slow_reason``), and its running estimate
(``measured_tflops``) drops below what it claims (issue 13 item 1; coordinator/jobs/speed.py)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from swarm.cli.status import status_json
from swarm.cli.train import upload_files
from swarm.compression import CodecSpec
from swarm.job_spec import JobSpec
from swarm.transport.coordinator_client import CoordinatorClient
from swarm.localswarm import node_ready, spawn_node, stop_all
from tests.helpers.procs import (FAST_COORDINATOR_ARGS, FAST_NODE_ARGS, REBALANCE_COORDINATOR_ARGS, NodeHandle,
                                 child_env, coordinator_proc, node_proc, wait_until)
from tests.multiproc.training._common import TEXT

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(180)
def test_a_slowed_node_is_reported_slow_by_its_neighbour(tmp_path):
    from swarm.model.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "model", num_layers=4, hidden_size=64, num_heads=4, max_position_embeddings=64)
    (tmp_path / "data.txt").write_text(TEXT * 8)
    args = [*FAST_COORDINATOR_ARGS, "--node-timeout-s", "20"]
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, node_proc(coord, tmp_path / "fast") as f, \
            node_proc(coord, tmp_path / "slow", env={"SWARM_FAULT": "slowdown=10"}) as s:
        wait_until(lambda: sum(n["state"] == "online" for n in coord.get_json("/api/nodes")["nodes"]) == 2, 60,
                   message="both nodes online")
        spec = JobSpec(steps=400, batch_size=8, micro_batch_size=2, seq_len=32, lr=1e-3, codec=CodecSpec.parse("none"),
                       checkpoint_every=0, num_stages=2, num_replicas=1, peer_timeout_s=30.0, node_wait_s=0.0)
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(spec, upload_files(tmp_path / "model", tmp_path / "data.txt")).id

            def slow_events():
                return [e for e in coord.get_json(f"/api/jobs/{job_id}")["events"] if e["kind"] == "slow_node"]

            wait_until(lambda: slow_events(), 90, message="a slow_node event")
            status = {n["id"]: n for n in status_json(client.snapshot())["nodes"]}  # swarm status --json
            client.cancel_job(job_id)
        ev = slow_events()
        assert [e["fields"]["node_id"] for e in ev] == [s.node_id], ev
        assert ev[0]["fields"]["relative_speed"] < 0.5 and ev[0]["fields"]["seen_tflops"] > 0, ev
        slow, fast = status[s.node_id], status[f.node_id]
        assert "planned speed" in slow["slow_reason"] and not fast["slow_reason"], (slow, fast)
        assert slow["measured_tflops"] < slow["tflops"], slow  # its running estimate, from what was seen


@pytest.mark.timeout(120)
def test_a_slowed_node_gets_fewer_layers_at_a_fence_without_rollback(tmp_path):
    """Issue 13 item 1, last clause: a node seen far below its plan triggers a re-balance. Three
    stages over three nodes, one slowed 10x: the job re-plans its layer split with the seen speeds
    at a fence (event ``rebalance``), the slowed node holds fewer layers, and the job finishes
    with every step committed exactly once (no rollback)."""
    from swarm.model.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "model", num_layers=6, hidden_size=64, num_heads=4, max_position_embeddings=64)
    (tmp_path / "data.txt").write_text(TEXT * 8)
    args = [*REBALANCE_COORDINATOR_ARGS, "--node-timeout-s", "20"]
    # the same claimed speed everywhere (low enough that no measurement replaces it): an even
    # first split, 2 layers per stage; the slowed node's neighbours then see it at ~0.1-0.3x
    claim = "claim-tflops=0.0001"
    with coordinator_proc(tmp_path / "coord", extra_args=args) as coord, \
            _nodes(coord, tmp_path, [claim, claim, f"{claim},slowdown=10"]) as (*fast, s):
        wait_until(lambda: sum(n["state"] == "online" for n in coord.get_json("/api/nodes")["nodes"]) == 3, 60,
                   message="3 nodes online")
        spec = JobSpec(steps=REBALANCE_STEPS, batch_size=8, micro_batch_size=2, seq_len=32, lr=1e-3,
                       codec=CodecSpec.parse("none"), checkpoint_every=0, num_stages=3, num_replicas=1,
                       peer_timeout_s=30.0, node_wait_s=0.0)
        with CoordinatorClient(coord.address, token=coord.admin_token) as client:
            job_id = client.submit_job(spec, upload_files(tmp_path / "model", tmp_path / "data.txt")).id
        detail = lambda: coord.get_json(f"/api/jobs/{job_id}")  # noqa: E731
        first = wait_until(lambda: (d := detail())["assignments"] and d, 30, message="the job is planned")
        layers = lambda asg: sum(a["layers"][1] - a["layers"][0] for a in asg if a["node_id"] == s.node_id)  # noqa: E731
        before = layers(first["assignments"])
        done = wait_until(lambda: (d := detail())["state"] in ("succeeded", "failed", "cancelled") and d, 100,
                          message="the job ends")
    assert done["state"] == "succeeded", done["reason"]
    ev = {e["kind"]: e for e in done["events"]}
    kinds = [e["kind"] for e in done["events"]]
    assert kinds.count("rebalance") == 1 and kinds.index("slow_node") < kinds.index("rebalance"), kinds
    rb, slow = ev["rebalance"]["fields"], next(e for e in done["events"] if e["kind"] == "slow_node")
    assert rb["node"] == s.node_id and rb["rollback"] is False and rb["predicted_gain"] >= 0.2, rb
    assert before == 2 and rb["seen_planned_ratio"] < 0.5 and rb["layers_before"] == before, (rb, before)
    assert layers(done["assignments"]) == rb["layers_after"] < before, (rb, done["assignments"])
    assert {a["node_id"] for a in done["assignments"]} == {s.node_id, *(f.node_id for f in fast)}
    steps = [p["step"] for p in done["progress"]]
    assert steps == list(range(REBALANCE_STEPS)), steps
    assert done["repeated_steps"] == [], [(e["kind"], e["message"]) for e in done["events"]]
    # what it cost: from the slow_node event to the first step committed under the new plan
    after = next(p for p in done["progress"] if p["step"] >= rb["resume_step"])
    print(f"rebalance at step {rb['resume_step']}: split {rb['split_before']} -> {rb['split_after']}, predicted "
          f"gain {rb['predicted_gain']:.0%}; slow_node -> rebalance event {ev['rebalance']['at'] - slow['at']:.1f} s, "
          f"-> first step committed under the new plan {after['at'] - slow['at']:.1f} s; "
          f"step times before/after: {_mean_step(done, 0, rb['resume_step']):.3f} s / "
          f"{_mean_step(done, rb['resume_step'] + 2, REBALANCE_STEPS):.3f} s")


STEPS = 60
# the re-balance test's job: on a quiet box 60 steps took 8 s, and the slow node was seen with only
# 6 steps left (the job finishes as is below MIN_STEPS_LEFT: CI 2026-12-01); 160 leave ~100 after it
REBALANCE_STEPS = 160


@contextmanager
def _nodes(coord, root, faults: list[str]):
    """Nodes started at once (start-ups overlap), node i with SWARM_FAULT ``faults[i]``."""
    procs = []
    try:
        for i, f in enumerate(faults):
            procs.append(spawn_node(coord.address, coord.token, root / f"n{i}", name=f"n{i}",
                                    extra_args=FAST_NODE_ARGS, env=child_env({"SWARM_FAULT": f})))
        yield [NodeHandle(proc=p, state_dir=root / f"n{i}", port=int(r["port"]), node_id=r["node_id"])
               for i, (p, r) in enumerate((p, node_ready(p, timeout_s=90)) for p in procs)]
    finally:
        stop_all(procs)


def _mean_step(detail, lo: int, hi: int) -> float:
    xs = [p["step_s"] for p in detail["progress"] if lo <= p["step"] < hi]
    return sum(xs) / max(1, len(xs))
