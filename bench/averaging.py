"""Gradient averaging between the replicas of one stage: cost of a round and where it goes.

Starts ``--replicas`` real :class:`swarm.pipeline.averaging.ReplicaAverager` instances in this
process (each with its own hivemind DHT and averager processes, on loopback) and runs ``--steps``
gradient rounds the way a stage worker does (begin, then finish, one thread per replica; the
replicas start each round at the same time, as replicas that finished their compute together).
For each round: the step's averaging time (the slowest replica's begin -> finish), and its parts:
the time until the all-reduce began (matchmaking, when there is any) and the all-reduce itself,
read from hivemind's ``StepControl.stage`` polled every millisecond. A stall is a round over
``--stall-s``. With ``--replicas 1`` a round is not run at all (a one-replica stage never
averages): the row shows the zero it costs.

    python -m bench.averaging [--steps 200] [--replicas 2] [--numel 16384] [--skew-s 0.2] [--json] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._record import markdown_table, record


def _stage_watch(control, out: dict, stop: threading.Event) -> None:
    """Record when the round's all-reduce began (hivemind's shared stage flag)."""
    from hivemind.averaging.control import AveragingStage

    while not stop.is_set() and control is not None:
        if control.stage in (AveragingStage.RUNNING_ALLREDUCE, AveragingStage.FINISHED) and "allreduce_at" not in out:
            out["allreduce_at"] = time.monotonic()
            return
        time.sleep(0.001)


def run(steps: int, replicas: int, numel: int, stall_s: float, skew_s: float = 0.0, seed: int = 0) -> dict:
    from swarm.pipeline.averaging import ReplicaAverager

    g = torch.Generator().manual_seed(seed)
    if replicas < 2:
        return {"replicas": replicas, "steps": steps, "ok": 0, "failed": 0, "round_s": [0.0] * steps,
                "matchmaking_s": [0.0] * steps, "allreduce_s": [0.0] * steps, "setup_s": 0.0}
    params = [[torch.nn.Parameter(torch.zeros(numel))] for _ in range(replicas)]
    t0 = time.monotonic()
    avs: list = []
    try:
        for k in range(replicas):
            peers = avs[0].maddrs() if avs else []
            avs.append(ReplicaAverager(params=params[k], prefix="bench_avg", num_replicas=replicas,
                                       initial_peers=peers, timeout_s=15.0))
        for av in avs:
            av.wait_for_peers(1, 30)
        maddrs = [m for av in avs for m in av.maddrs()]
        for av in avs:  # the group, learnt once (a stage worker: from the coordinator's rendezvous)
            av.set_members(maddrs)
        setup_s = time.monotonic() - t0
        round_s, mm_s, ar_s = [], [], []
        for step in range(steps):
            for p in params:
                p[0].grad = torch.randn(numel, generator=g)
            barrier = threading.Barrier(replicas)
            times: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * replicas
            delays = (torch.rand(replicas, generator=g) * skew_s).tolist()

            def one(k: int) -> None:
                barrier.wait()
                time.sleep(delays[k])  # replicas finish their compute at different times
                start = time.monotonic()
                avs[k].begin_gradient_round(step)
                watch: dict = {}
                stop = threading.Event()
                pending = avs[k]._pending  # the bench reads the round's hivemind StepControl
                w = threading.Thread(target=_stage_watch, args=(pending[1] if pending else None, watch, stop))
                w.start()
                avs[k].finish_gradient_round()
                end = time.monotonic()
                stop.set()
                w.join()
                times[k] = (start, watch.get("allreduce_at", end), end)

            threads = [threading.Thread(target=one, args=(k,)) for k in range(replicas)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            start = max(t[0] for t in times)  # the cost beyond the last replica's arrival
            round_s.append(max(t[2] for t in times) - start)
            mm_s.append(max(0.0, max(t[1] for t in times) - start))
            ar_s.append(round_s[-1] - mm_s[-1])
        return {"replicas": replicas, "steps": steps, "ok": sum(av.num_ok for av in avs),
                "failed": sum(av.num_failed for av in avs), "round_s": round_s, "matchmaking_s": mm_s,
                "allreduce_s": ar_s, "setup_s": setup_s}
    finally:
        for av in avs:
            av.shutdown()


def run_job(steps: int, replicas: int, stages: int, stall_s: float) -> dict:
    """A real job (coordinator + ``stages * replicas`` node processes, bench/chaos.py's tiny GPT-2
    and corpus) of ``steps`` steps; each step's time as its nodes reported it (slowest replica)."""
    import tempfile
    from types import SimpleNamespace

    from bench.chaos_swarm import Swarm, inputs, submit
    from swarm.localswarm import wait_until

    with tempfile.TemporaryDirectory(prefix="swarm-avgbench-") as tmp:
        root = Path(tmp)
        model, data, _ = inputs(root, train_bytes=100_000)
        swarm = Swarm(root, stages * replicas)
        try:
            wait_until(lambda: sum(n["state"] == "online" for n in swarm.get("/api/nodes")["nodes"])
                       >= stages * replicas, 60, message="nodes online")
            job_id = submit(swarm, model, data, SimpleNamespace(steps=steps, stages=stages, replicas=replicas,
                                                                 checkpoint_every=0))
            wait_until(lambda: swarm.get(f"/api/jobs/{job_id}")["state"] in ("succeeded", "failed", "cancelled"),
                       60 + steps * 30, interval_s=1.0, message="job ends")
            job = swarm.get(f"/api/jobs/{job_id}")
        finally:
            swarm.stop()
    by_step: dict[int, float] = {}
    for p in job["progress"]:
        if p.get("step_s"):
            by_step[p["step"]] = max(by_step.get(p["step"], 0.0), p["step_s"])
    times = [by_step[s] for s in sorted(by_step)][3:]  # the first steps are set-up
    return {"replicas": replicas, "stages": stages, "steps": steps, "state": job["state"], "step_s": times,
            "attempt": job.get("attempt"), "wall_s": (job.get("finished_at") or 0) - (job.get("started_at") or 0)}


def summarize_job(res: dict, stall_s: float) -> list[object]:
    t = res["step_s"] or [float("nan")]
    return [res["replicas"], res["stages"], len(res["step_s"]), res["state"], statistics.median(t),
            sorted(t)[int(0.9 * (len(t) - 1))], max(t), sum(t) / len(t), sum(x > stall_s for x in t),
            round(res["wall_s"], 1)]


JOB_HEADERS = ["replicas", "stages", "steps timed", "state", "median step s", "p90 s", "max s", "mean s", "stalls",
               "job wall s"]


def summarize(res: dict, stall_s: float) -> list[object]:
    r, mm, ar = res["round_s"], res["matchmaking_s"], res["allreduce_s"]
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return [res["replicas"], res["steps"], statistics.median(r), q(r, 0.9), max(r), sum(r) / len(r),
            statistics.median(mm), statistics.median(ar), sum(x > stall_s for x in r),
            f"{res['ok']}/{res['ok'] + res['failed']}"]


HEADERS = ["replicas", "steps", "median round s", "p90 s", "max s", "mean s", "median until all-reduce s",
           "median all-reduce s", "stalls", "rounds ok"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--numel", type=int, default=16384, help="gradient elements per replica (float32)")
    ap.add_argument("--skew-s", type=float, default=0.2,
                    help="each replica starts a round after a random delay in [0, this) (compute time differs)")
    ap.add_argument("--stall-s", type=float, default=5.0, help="a round longer than this is a stall")
    ap.add_argument("--job", action="store_true",
                    help="run a real job (coordinator + node processes) with 1 replica and with --replicas "
                         "instead, and compare their step times")
    ap.add_argument("--stages", type=int, default=1, help="--job: pipeline stages")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--label", default="", help="a note for the recorded section (e.g. before/after)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.replicas < 1 or args.numel < 1:
        ap.error("--steps, --replicas and --numel must be positive")
    if args.job:
        results = [run_job(args.steps, r, args.stages, args.stall_s) for r in sorted({1, args.replicas})]
        table = markdown_table(JOB_HEADERS, [summarize_job(r, args.stall_s) for r in results])
        print(json.dumps(results) if args.json else table)
        if not args.no_record:
            notes = (f"`python -m bench.averaging --job --steps {args.steps} --replicas {args.replicas} --stages "
                     f"{args.stages}` {args.label}: bench/chaos.py's tiny GPT-2 (6 layers, hidden 64), batch 8, "
                     f"one node process per stage replica on this machine; a step's time is the slowest replica's "
                     f"reported step_s; the first 3 steps (set-up) are not counted; a stall is a step over "
                     f"{args.stall_s:g} s.")
            record("Training step time with and without replicas (real job)", table, notes)
        return 0
    res = run(args.steps, args.replicas, args.numel, args.stall_s, args.skew_s)
    table = markdown_table(HEADERS, [summarize(res, args.stall_s)])
    if args.json:
        print(json.dumps({k: v for k, v in res.items()}))
    else:
        print(table)
    if not args.no_record:
        notes = (f"`python -m bench.averaging --steps {args.steps} --replicas {args.replicas} --numel {args.numel} --skew-s {args.skew_s:g}`"
                 f" {args.label}: {args.numel} float32 gradient elements per replica, loopback, replicas in one "
                 f"process (one hivemind DHT + averager process each); set-up {res['setup_s']:.1f} s. A stall is "
                 f"a round over {args.stall_s:g} s; 'until all-reduce' is matchmaking when there is any. Each replica starts a round after a random "
                 f"delay in [0, {args.skew_s:g}) s; times are counted from the last replica's start (what the round "
                 f"adds to a step).")
        record("Gradient averaging round (hivemind, loopback)", table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
