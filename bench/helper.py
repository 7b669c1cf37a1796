"""A late node as a helper replica of the slowest stage (issue 14 item 2): what it buys.

    python -m bench.helper [--steps N] [--slowdown F] [--device cpu|cuda] [--no-record] [--json]

Two runs of the same job (tiny GPT-2, 2 stages x 1 replica, same seed and data), each in a fresh
local swarm of three node processes: ``slow`` (``SWARM_FAULT=slowdown=F``: every forward and
backward takes F times its compute time, an emulated slower GPU), ``fast``, and ``late``, which
starts once the job runs.

1. ``no helper``: the coordinator runs with ``--no-helpers``: ``late`` stays idle;
2. ``helper``: ``late`` joins the slowest stage as a helper at a fence (coordinator/jobs/helpers.py).

Both coordinators run with ``--no-rebalance`` (layers never move: the helper's effect alone).
Reported: the step the helper joined at (J) in run 2; tokens/s of run 2 before J and of both runs
over the same window from J + 5 to the end (tokens of the committed steps over the wall time
between their commits); the time from the fence opening to the first step committed with the
helper; and both runs' final loss and held-out loss. Prints a table and appends it to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench._record import markdown_table, record
from bench.chaos_swarm import heldout_loss, inputs
from bench.verification import NODE_ARGS, wait_job
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until

COORDINATOR_ARGS = ["--heartbeat-interval-s", "0.5", "--node-timeout-s", "10", "--log-level", "INFO",
                    "--no-rebalance"]


def window_tokens_per_s(job: dict, lo: int, hi: int) -> float:
    """Tokens of the committed steps in [lo, hi) after the first over the wall time between their commits."""
    pts = sorted((p for p in job["progress"] if lo <= p["step"] < hi), key=lambda p: p["at"])
    if len(pts) < 3:
        return float("nan")
    return sum(p["tokens"] for p in pts[1:]) / (pts[-1]["at"] - pts[0]["at"])


def one_run(root: Path, *, helpers: bool, args) -> dict:
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.job_spec import JobSpec
    from swarm.transport.coordinator_client import CoordinatorClient

    model, data, heldout = inputs(root, train_bytes=60_000)
    coord, ready = start_coordinator(root / "coord", extra_args=COORDINATOR_ARGS + ([] if helpers else ["--no-helpers"]))
    address, http_port, admin = f"127.0.0.1:{ready['port']}", int(ready["http_port"]), ready["admin_token"]
    procs = []

    def get(path: str):
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", headers={"Authorization": f"Bearer {admin}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def node(name: str, fault: str):
        proc, r = start_node(address, ready["token"], root / name, name=name, device=args.device, extra_args=NODE_ARGS,
                             env=child_env({"SWARM_FAULT": fault}))
        procs.append(proc)
        return r["node_id"]

    try:
        slow = node("slow", f"claim-tflops=0.00002,slowdown={args.slowdown:g}")
        node("fast", "claim-tflops=0.0001")
        wait_until(lambda: sum(n["state"] == "online" for n in get("/api/nodes")["nodes"]) == 2, 120, message="2 online")
        spec = JobSpec(steps=args.steps, batch_size=8, micro_batch_size=2, seq_len=64, lr=2e-3,
                       codec=CodecSpec.parse("none"), checkpoint_every=0, num_stages=2, num_replicas=1,
                       peer_timeout_s=30.0, warmup_steps=10, seed=1, node_wait_s=0.0)
        with CoordinatorClient(address, token=admin) as client:
            job_id = client.submit_job(spec, upload_files(model, data)).id
        wait_until(lambda: (get(f"/api/jobs/{job_id}")["step"] or 0) >= 2, 120, message="the job runs")
        late = node("late", "claim-tflops=0.0001")
        job = wait_job(SimpleNamespace(get=get), job_id, args.timeout_s)
        if job["state"] != "succeeded":
            raise SystemExit(f"run {'helper' if helpers else 'no helper'}: job {job['state']}: {job['reason']}")
        added = next((e for e in job["events"] if e["kind"] == "replica_added"), None)
        slow_stage = next(a["stage"] for a in job["assignments"] if a["node_id"] == slow)
        return {"job": job, "join_step": added["fields"]["resume_step"] if added else None,
                "join_at": added["at"] if added else None, "late": late, "slow_stage": slow_stage,
                "helper_stage": added["fields"]["stage"] if added else None,
                "heldout": heldout_loss(root / "coord" / "jobs" / job_id / "result", heldout)}
    finally:
        for p in procs:
            p.stop()
        coord.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--slowdown", type=float, default=30.0, help="the slow node's SWARM_FAULT slowdown factor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    runs = {}
    for name, helpers in (("no helper", False), ("helper", True)):
        with tempfile.TemporaryDirectory(prefix="swarm-helper-") as tmp:
            t0 = time.monotonic()
            runs[name] = one_run(Path(tmp), helpers=helpers, args=args)
            print(f"{name}: {time.monotonic() - t0:.0f} s, joined at {runs[name]['join_step']}", file=sys.stderr)
    h, n = runs["helper"], runs["no helper"]
    if h["join_step"] is None:
        raise SystemExit("the late node did not join as a helper")
    j = h["join_step"]
    lo, hi = j + 5, args.steps
    first_after = min((p["at"] for p in h["job"]["progress"] if p["step"] >= j), default=float("nan"))
    fence_events = [e for e in h["job"]["events"] if e["kind"] == "replan" and (e["fields"] or {}).get("fence")]
    opened = fence_events[0]["at"] if fence_events else h["join_at"]
    rows = [
        ["no helper", f"{lo}-{hi - 1}", window_tokens_per_s(n["job"], lo, hi), n["job"]["loss"], n["heldout"]],
        ["helper, before it joined", f"1-{j - 1}", window_tokens_per_s(h["job"], 1, j), "", ""],
        ["helper", f"{lo}-{hi - 1}", window_tokens_per_s(h["job"], lo, hi), h["job"]["loss"], h["heldout"]],
    ]
    ratio = rows[2][2] / rows[0][2]
    tokens = 8 * 64  # per step
    replan = next((e["fields"] for e in h["job"]["events"] if e["kind"] == "replan"
                   and (e["fields"] or {}).get("helper_stage") is not None), {})
    predicted = (f"; the coordinator predicted the step {replan['step_s_before']:.3g} s -> "
                 f"{replan['predicted_step_s']:.3g} s, measured {tokens / rows[1][2]:.3g} s -> {tokens / rows[2][2]:.3g} s"
                 if replan.get("predicted_step_s") else "")
    table = markdown_table(["run", "steps", "tokens/s", "final loss", "held-out loss"], rows)
    notes = (f"2 stages x 1 replica, {args.steps} steps of 8 x 64 tokens (4 micro-batches of 2), tiny GPT-2 on "
             f"{args.device}; the slow node (slowdown {args.slowdown:g}) holds stage {h['slow_stage']}. The late node "
             f"joined stage {h['helper_stage']} as a helper at step {j}: helper / no helper tokens/s over the same "
             f"steps {ratio:.2f}x; the re-plan at the fence to the first step committed with the helper "
             f"{first_after - opened:.1f} s (its weights and AdamW state copied peer to peer){predicted}.")
    print(table)
    print(notes)
    if not args.no_record:
        record("Helper replica of the slowest stage (bench/helper.py)", table, notes)
    if args.json:
        print(json.dumps({"ratio": ratio, "join_step": j, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
