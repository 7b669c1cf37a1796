"""Trust but verify (issue 13): what spot checks cost and how fast they catch a corrupting node.

    python -m bench.verification [--quick] [--steps N] [--prob P] [--compression C] [--no-record] [--json]

A coordinator and node processes on this machine (no root needed) train a tiny GPT-2 on a slice
of the Python standard library as a 2 replicas x 2 stages job, three times with the same spec,
seed and data:

1. ``off``: honest nodes, ``--verify-prob 0``;
2. ``checked``: honest nodes, spot checks at ``--prob`` (default: the JobSpec default);
3. ``faulty``: the same, with one node at ``SWARM_FAULT=corrupt-activations=0.2`` (``--fault``)
   and a spare node that joins once the job runs (so the job can re-plan without the faulty one).

Runs 1 and 2 alternate ``--repeats`` times. Reported: tokens/s of each run (tokens of the
committed steps after the first, over the wall time between their commits; the median over the
repeats), the checked / off ratio, the checks counted by the coordinator
(weighed vs void), the step at which the faulty node was first accused (one checker's word opens
a dispute: rollback and re-pairing, coordinator/jobs/spotchecks.py) and found (its first detected
bad step and the committed step when it was quarantined), and the loss curve and held-out loss of the final
model of ``faulty`` against ``checked``. Prints a table and appends it to docs/benchmarks.md.

``--quick``: fewer steps and smaller batches (CPU, a few minutes); the full run is meant for a
16-core machine. ``--compression`` (default ``none``) runs all three with that boundary codec, e.g.
``aqsgd:fw=4,bw=8``: compressed boundaries are checked by replaying the sender
(swarm/compression/replay.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._cpu import tree_cpu_s
from bench._record import markdown_table, record
from bench.chaos_swarm import heldout_loss, inputs
from swarm.job_spec import DEFAULT_VERIFY_PROB
from swarm.localswarm import child_env, start_coordinator, start_node, wait_until

COORDINATOR_ARGS = ["--heartbeat-interval-s", "0.5", "--node-timeout-s", "10", "--log-level", "INFO"]
NODE_ARGS = ["--probe-seconds", "0.1", "--log-level", "INFO"]
FAULT = "corrupt-activations=0.2"


class Swarm:
    """A coordinator and named node processes under ``root``."""

    def __init__(self, root: Path, device: str = "cpu") -> None:
        self.root, self.device = root, device
        self.coord, ready = start_coordinator(root / "coord", extra_args=COORDINATOR_ARGS)
        self.address = f"127.0.0.1:{ready['port']}"
        self.http_port, self.token, self.admin_token = int(ready["http_port"]), ready["token"], ready["admin_token"]
        self.nodes: dict[str, tuple[object, str]] = {}  # name -> (process, node id)

    def add_node(self, name: str, fault: str = "") -> str:
        env = child_env({"SWARM_FAULT": fault}) if fault else None
        proc, ready = start_node(self.address, self.token, self.root / name, name=name, device=self.device,
                                 extra_args=NODE_ARGS, env=env)
        self.nodes[name] = (proc, ready["node_id"])
        return ready["node_id"]

    def stop_node(self, name: str) -> None:
        proc, _ = self.nodes.pop(name)
        proc.stop()

    def get(self, path: str):
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def online(self) -> int:
        return sum(n["state"] == "online" for n in self.get("/api/nodes")["nodes"])

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the coordinator, the nodes and all their descendants
        (hivemind's processes) have used so far, exited children that were waited for included."""
        roots = [self.coord.proc.pid] + [p.proc.pid for p, _ in self.nodes.values()]
        return tree_cpu_s(roots)

    def stop(self) -> None:
        for proc, _ in self.nodes.values():
            proc.stop()
        self.coord.stop()


def submit(swarm: Swarm, model: Path, data: Path, *, steps: int, batch_size: int, prob: float,
           codec: str = "none") -> str:
    from swarm.cli.train import upload_files
    from swarm.compression import CodecSpec
    from swarm.job_spec import JobSpec
    from swarm.transport.coordinator_client import CoordinatorClient

    spec = JobSpec(steps=steps, batch_size=batch_size, micro_batch_size=2, seq_len=64, lr=2e-3,
                   codec=CodecSpec.parse(codec), checkpoint_every=10, num_stages=2, num_replicas=2,
                   peer_timeout_s=30.0, warmup_steps=10, seed=1, verify_prob=prob)
    with CoordinatorClient(swarm.address, token=swarm.admin_token) as client:
        return client.submit_job(spec, upload_files(model, data)).id


def wait_job(swarm: Swarm, job_id: str, timeout_s: float, on_poll=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = swarm.get(f"/api/jobs/{job_id}")
        if on_poll is not None:
            on_poll(d)
        if d["state"] in ("succeeded", "failed", "cancelled"):
            return d
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not end within {timeout_s:.0f} s")


def tokens_per_s(job: dict) -> float:
    """Tokens of the committed steps after the first over the wall time between their commits
    (set-up, re-plans' restarts and the rollback's repeated steps count as time, not tokens)."""
    pts = sorted(job["progress"], key=lambda p: p["at"])
    if len(pts) < 3:
        return float("nan")
    steps = {p["step"] for p in pts[1:]}
    tokens = len(steps) * pts[-1]["tokens"]
    return tokens / (pts[-1]["at"] - pts[0]["at"])


def loss_curve(job: dict, points: int = 6) -> list[tuple[int, float]]:
    """(step, loss) at ``points`` evenly spaced steps; the last attempt's loss wins for a step."""
    by_step = {}
    for p in sorted(job["progress"], key=lambda p: (p["attempt"], p["at"])):
        if p["loss"] is not None:
            by_step[p["step"]] = p["loss"]
    if not by_step:
        return []
    last = max(by_step)
    picks = sorted({round(last * k / (points - 1)) for k in range(points)})
    return [(s, by_step[s]) for s in picks if s in by_step]


# recompute and weights (sketch + digest) run while the gradient round is in flight: round_s is
# that round's whole wait, checking included (node/training/worker.py)
COST_PARTS = ("recompute_s", "weights_s", "resync_s", "witness_s", "round_s")


def cost_split(logs, job_ids) -> dict[str, float]:
    """Share of the stage workers' step time each part of checking took in the ``job_ids`` runs,
    from the ``spot-check cost`` lines the workers log at the end (node/training/worker.py)."""
    totals = dict.fromkeys(("step_s",) + COST_PARTS, 0.0)
    for path in logs:
        for line in Path(path).read_text(errors="replace").splitlines():
            if "spot-check cost" not in line:
                continue
            kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if kv.get("job") in job_ids:
                for k in totals:
                    totals[k] += float(kv.get(k, 0.0))
    return {k: totals[k] / totals["step_s"] for k in COST_PARTS} if totals["step_s"] else {}


def run(args) -> dict:
    out: dict = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="swarm-verify-") as tmp:
        root = Path(tmp)
        model, data, heldout = inputs(root, train_bytes=60_000 if args.quick else 400_000)
        swarm = Swarm(root, device=args.device)
        try:
            for i in range(4):
                swarm.add_node(f"n{i}")
            wait_until(lambda: swarm.online() >= 4, 120, message="4 nodes online")
            # off and checked alternate (--repeats times): the median of each is reported, so a
            # neighbour's load on a shared machine hits both alike
            for _ in range(args.repeats):
                for name, prob in (("off", 0.0), ("checked", args.prob)):
                    t0, c0 = time.monotonic(), swarm.cpu_s()
                    job_id = submit(swarm, model, data, steps=args.steps, batch_size=args.batch_size, prob=prob,
                                    codec=args.compression)
                    job = wait_job(swarm, job_id, args.timeout_s)
                    s = _summary(job, root, heldout, time.monotonic() - t0)
                    out.setdefault("repeats", {}).setdefault(name, []).append(s["tokens_per_s"])
                    out.setdefault("cpu_s", {}).setdefault(name, []).append(swarm.cpu_s() - c0)
                    out["runs"][name] = s
                    print(f"{name}: {job['state']} {job['reason']} {s['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
                    if name == "checked":
                        out.setdefault("checked_jobs", []).append(job_id)
            for name, values in out["repeats"].items():
                out["runs"][name]["tokens_per_s"] = statistics.median(values)
            out["cost_split"] = cost_split([p.log_path for p, _ in swarm.nodes.values()], out["checked_jobs"])
            if args.no_faulty:
                return out
            # the faulty run: n3 makes way for the faulty node, then comes back as the spare
            swarm.stop_node("n3")
            faulty_id = swarm.add_node("faulty", fault=args.fault)
            wait_until(lambda: swarm.online() == 4, 120, message="4 nodes online with the faulty one")
            t0 = time.monotonic()
            job_id = submit(swarm, model, data, steps=args.steps, batch_size=args.batch_size, prob=args.prob,
                            codec=args.compression)
            wait_until(lambda: swarm.get(f"/api/jobs/{job_id}")["state"] != "pending", 60, message="job planned")
            swarm.add_node("n3")
            seen: dict = {"step_at_quarantine": None}

            def on_poll(d: dict) -> None:
                if seen["step_at_quarantine"] is None and any(e["kind"] == "quarantined" for e in d["events"]):
                    seen["step_at_quarantine"] = d["step"]

            job = wait_job(swarm, job_id, args.timeout_s, on_poll)
            s = _summary(job, root, heldout, time.monotonic() - t0)
            nodes = {n["id"]: n for n in swarm.get("/api/nodes")["nodes"]}
            q = [e for e in job["events"] if e["kind"] == "quarantined"]
            disputed = [e for e in job["events"] if e["kind"] == "disputed"]
            s.update(faulty_state=nodes[faulty_id]["state"],
                     disputes=len(disputed), first_disputed_step=disputed[0]["fields"]["step"] if disputed else None,
                     honest_quarantined=sum(n["state"] == "quarantined" for i, n in nodes.items() if i != faulty_id),
                     first_bad_step=q[0]["fields"].get("first_bad_step") if q else None,
                     step_at_quarantine=seen["step_at_quarantine"],
                     quarantined_node_is_faulty=bool(q) and q[0]["fields"].get("node") == faulty_id)
            out["runs"]["faulty"] = s
            print(f"faulty: {job['state']} {job['reason']}", file=sys.stderr)
        finally:
            swarm.stop()
    return out


def _summary(job: dict, root: Path, heldout: str, wall_s: float) -> dict:
    loss = float("nan")
    if job["state"] == "succeeded":
        loss = heldout_loss(root / "coord" / "jobs" / job["id"] / "result", heldout)
    return {"state": job["state"], "reason": job["reason"], "attempts": job["attempt"], "wall_s": wall_s,
            "tokens_per_s": tokens_per_s(job), "heldout_loss": loss, "spot_checks": job["spot_checks"],
            "loss_curve": loss_curve(job)}


def _codec_text(text: str) -> str:
    """``--compression``: refused before any process starts when it does not parse."""
    from swarm.compression import CodecSpec
    from swarm.errors import ConfigError

    try:
        CodecSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, small batches (CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 40 quick, 300 full)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32 quick, 64 full)")
    p.add_argument("--repeats", type=int, default=None, help="off/checked pairs (default 1 quick, 3 full)")
    p.add_argument("--prob", type=float, default=DEFAULT_VERIFY_PROB,
                   help=f"--verify-prob of the checked runs (default {DEFAULT_VERIFY_PROB}, the JobSpec default)")
    p.add_argument("--timeout-s", type=float, default=None, help="per run (default 900 quick, 3600 full)")
    p.add_argument("--compression", default="none", type=_codec_text,
                   help="the job's boundary codec (default none), e.g. aqsgd:fw=4,bw=8")
    p.add_argument("--device", default="cpu", help="the nodes' device: cpu (default) or cuda (all four share it)")
    p.add_argument("--fault", default=FAULT, help=f"the faulty node's SWARM_FAULT (default {FAULT}; e.g. "
                   "false-witness=1: a witness sending its neighbours' checker false copies)")
    p.add_argument("--no-faulty", action="store_true",
                   help="only the off / checked pairs (the cost), no faulty run (the detection)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line too")
    args = p.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 300)
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.timeout_s = args.timeout_s or (900 if args.quick else 3600)
    args.repeats = args.repeats or (1 if args.quick else 3)
    res = run(args)
    r = res["runs"]
    rows = []
    for name in [n for n in ("off", "checked", "faulty") if n in r]:
        x = r[name]
        c = x["spot_checks"]
        rows.append([name, x["state"], x["attempts"], f"{x['tokens_per_s']:.0f}", f"{x['heldout_loss']:.4f}",
                     f"{c['checks']} / {c['weighed']} / {c['unverifiable']} / {c['mismatches']} / {c.get('contested', 0)}",
                     " ".join(f"{s}:{v:.3f}" for s, v in x["loss_curve"])])
    table = markdown_table(["run", "state", "attempts", "tokens/s", "held-out loss",
                            "checks / weighed / void / mismatches / contested", "loss curve (step:loss)"], rows)
    f = r.get("faulty")
    ratio = r["checked"]["tokens_per_s"] / r["off"]["tokens_per_s"]
    m = args.batch_size // 2 // 2
    tps = "; ".join(f"{k}: " + ", ".join(f"{v:.0f}" for v in vs) for k, vs in res["repeats"].items())
    notes = (f"2 stages x 2 replicas, {args.steps} steps of {args.batch_size} x 64 tokens ({m} micro-batches of 2 "
             f"per replica and step), tiny GPT-2 (6 x 64) on {args.device}, --compression {args.compression}, --verify-prob {args.prob} in the checked runs. "
             f"Checked / off tokens/s (medians of {args.repeats}; each run: {tps}): {ratio:.3f} "
             f"(cost {100 * (1 - ratio):.1f}%). "
             + (f"Faulty node "
                f"({args.fault}): first accused at step {f.get('first_disputed_step')} ({f.get('disputes', 0)} dispute(s): "
                f"one node's word rolls back and re-pairs, a second one convicts); {f['faulty_state']}, "
                f"first detected bad step {f['first_bad_step']}, job at step "
                f"{f['step_at_quarantine']} when quarantined; honest nodes quarantined: {f['honest_quarantined']}; "
                f"held-out loss faulty - checked: {f['heldout_loss'] - r['checked']['heldout_loss']:+.4f} nats. "
                if f else "No faulty run (--no-faulty). ")
             + "Share of the checked runs' step time (all workers) spent on: "
             + ", ".join(f"{k[:-2]} {100 * v:.1f}%" for k, v in res["cost_split"].items()) + ".")
    cpu = {k: statistics.median(v) for k, v in res["cpu_s"].items()}
    notes += (" CPU seconds per job (coordinator, nodes and hivemind's processes; medians; each run: "
              + "; ".join(f"{k}: " + ", ".join(f"{v:.1f}" for v in vs) for k, vs in res["cpu_s"].items())
              + f"): off {cpu['off']:.1f}, checked {cpu['checked']:.1f}; off / checked CPU "
              f"{cpu['off'] / cpu['checked']:.3f} (the tokens/s ratio to expect where the CPU is the bottleneck).")
    print(table)
    print(notes)
    if args.json:
        print(json.dumps(res))
    if not args.no_record:
        flags = ((" --quick" if args.quick else "") + (f" --compression {args.compression}" if args.compression != "none" else "")
                 + (f" --fault {args.fault}" if args.fault != FAULT else "") + (" --no-faulty" if args.no_faulty else ""))
        record(f"Spot checks: cost and detection (bench/verification.py{flags})",
               table, notes)
    ok = (all(x["state"] == "succeeded" for x in r.values())
          and (f is None or (f["faulty_state"] == "quarantined" and f["honest_quarantined"] == 0)))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
