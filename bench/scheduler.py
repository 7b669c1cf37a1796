"""Scheduler benchmark: `swarm plan` on DT-FM's five scenarios (and id-shuffled copies), next to a
random balanced plan, a naive in-order plan and the costs DT-FM's own scheduler reached; plus a
1,024-device synthetic cluster.

    python -m bench.scheduler [--time-budget-s 60] [--quick] [--no-record]

Every "ours" row runs the real CLI (`python -m swarm.cli plan --cluster F --json`) in a
subprocess and re-scores the plan it printed with the cost formulas (as a fixed assignment:
pipeline i = the i-th device of every stage), so the number is the plan's, not the search's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import markdown_table, record  # noqa: E402
from swarm.scheduling import Cluster, JobShape, Plan, evaluate_plan  # noqa: E402
from swarm.scheduling.cluster import cluster_and_job_from_json  # noqa: E402
from swarm.scheduling.costs import dp_matrix, fixed_assignment_cost, partition_cost, pp_matrix  # noqa: E402

SHARED = Path("/work/shared/bench/scheduler")
REPO = Path(__file__).resolve().parent.parent


def run_cli(path: Path, budget_s: float, seed: int = 0, extra: list[str] | None = None) -> tuple[dict, float]:
    """Run `swarm plan --json` in a subprocess; (its JSON, wall seconds of the whole command)."""
    cmd = [sys.executable, "-m", "swarm.cli", "plan", "--cluster", str(path), "--json", "--seed", str(seed), "--time-budget-s", str(budget_s)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run(cmd + (extra or []), capture_output=True, text=True, env=env, timeout=budget_s * 2 + 120, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"swarm plan failed on {path}: {out.stderr.strip()}")
    return json.loads(out.stdout), wall


def shuffled_copy(obj: dict, seed: int) -> dict:
    """The same scenario with devices listed in a random order (ids keep their meaning)."""
    n = len(obj["delay_s"])
    perm = np.random.default_rng(seed).permutation(n)
    d = np.asarray(obj["delay_s"])[np.ix_(perm, perm)]
    b = np.asarray(obj["bandwidth_Bps"])[np.ix_(perm, perm)]
    regions = obj.get("regions")
    out = {k: v for k, v in obj.items() if k not in ("delay_s", "bandwidth_Bps", "regions")}
    out["devices"] = [{"id": int(i)} | ({"region": regions[i]} if regions else {}) for i in perm]
    out["delay_s"] = d.tolist()
    out["bandwidth_Bps"] = b.tolist()
    out["name"] = obj.get("name", "") + f"_shuffled{seed}"
    return out


def baselines(cluster: Cluster, job: JobShape, dp: int, pp: int, seeds: int = 5) -> tuple[float, float]:
    """(mean cost of random balanced partitions with their best order, naive in-order plan cost)."""
    a = dp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_dp_bytes or job.grad_bytes_per_layer(pp) * job.num_layers / pp, dp)
    w = pp_matrix(cluster.delay_s, cluster.bandwidth_Bps, job.c_pp(dp))
    n = cluster.num_devices
    rand = []
    for s in range(seeds):
        perm = np.random.default_rng(1000 + s).permutation(n).tolist()
        rand.append(partition_cost(a, w, [perm[g * dp : (g + 1) * dp] for g in range(pp)]).total)
    # naive: stage j = devices j*dp .. j*dp+dp-1 in listed order, pipeline i = i-th of each
    naive, _, _ = fixed_assignment_cost(a, w, [list(range(j * dp, (j + 1) * dp)) for j in range(pp)])
    return float(np.mean(rand)), float(naive)


def synthetic(n_regions: int = 32, per_region: int = 32, seed: int = 0) -> dict:
    """Regions scattered on a 20,000 x 10,000 km map; 10 Gbit/s inside, 0.3-1.2 Gbit/s across."""
    rng = np.random.default_rng(seed)
    pos = rng.random((n_regions, 2)) * np.array([20000.0, 10000.0])
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=2)
    r_delay = 0.005 + dist / 200_000.0  # 5 ms + light in fibre (200,000 km/s)
    r_bw = rng.uniform(0.3e9, 1.2e9, (n_regions, n_regions)) / 8
    r_bw = np.minimum(r_bw, r_bw.T)
    reg = np.repeat(np.arange(n_regions), per_region)
    same = reg[:, None] == reg[None]
    delay = np.where(same, 0.001, r_delay[reg][:, reg])
    bw = np.where(same, 10e9 / 8, r_bw[reg][:, reg])
    perm = rng.permutation(len(reg))  # ids carry no meaning
    delay, bw, reg = delay[np.ix_(perm, perm)], bw[np.ix_(perm, perm)], reg[perm]
    return {
        "name": f"synthetic_{n_regions}x{per_region}",
        "devices": [{"id": f"g{i}", "region": f"r{reg[i]}"} for i in range(len(reg))],
        "delay_s": delay.tolist(),
        "bandwidth_Bps": bw.tolist(),
        "d_dp": 32,
        "d_pp": 32,
        "model": {"num_layers": 64, "hidden_size": 4096, "seq_len": 2048, "num_params": 13e9, "global_batch_seqs": 2048, "micro_batch_seqs": 1},
    }


def plan_cost(cluster: Cluster, job: JobShape, out: dict) -> float:
    """The printed plan's cost, recomputed from the formulas as a fixed assignment."""
    return evaluate_plan(cluster, job, Plan.from_json(out)).cost_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-budget-s", type=float, default=60.0)
    ap.add_argument("--synthetic-budget-s", type=float, default=100.0)
    ap.add_argument("--quick", action="store_true", help="scenarios only, no shuffled copies or synthetic")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    ref = json.loads((SHARED / "dtfm_reference.json").read_text())
    rows = []
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted((SHARED / "scenarios").glob("*.json")):
            obj = json.loads(path.read_text())
            r = ref[path.stem]
            variants = [("as given", path, obj)]
            if not args.quick:
                sh = shuffled_copy(obj, seed=1)
                sp = Path(tmp) / f"{path.stem}_shuffled.json"
                sp.write_text(json.dumps(sh))
                variants.append(("ids shuffled", sp, sh))
            for label, p, o in variants:
                cluster, job = cluster_and_job_from_json(o)
                out, wall = run_cli(p, args.time_budget_s)
                cost = plan_cost(cluster, job, out)
                assert abs(cost - out["cost_s"]) <= 1e-9 * max(1.0, cost), (cost, out["cost_s"])
                rand, naive = baselines(cluster, job, o["d_dp"], o["d_pp"])
                ok = cost <= r["dtfm_ga_cost_min"] * (1 + 1e-12)
                all_ok &= ok
                rows.append([
                    path.stem, label, f"{cost:.4f}", f"{out['search_s']:.2f}", f"{wall:.2f}",
                    f"{r['dtfm_ga_cost_min']:.4f}", f"{r['dtfm_ga_seconds']:.0f}", f"{rand:.4f}", f"{naive:.4f}",
                    "yes" if ok else "NO",
                ])
                print("\t".join(str(x) for x in rows[-1]), flush=True)
        syn_row = None
        if not args.quick:
            obj = synthetic()
            sp = Path(tmp) / "synthetic.json"
            sp.write_text(json.dumps(obj))
            cluster, job = cluster_and_job_from_json(obj)
            out, wall = run_cli(sp, args.synthetic_budget_s)
            cost = plan_cost(cluster, job, out)
            rand, naive = baselines(cluster, job, 32, 32, seeds=2)
            syn_row = [obj["name"], "1024 devices, 32 x 32", f"{cost:.4f}", f"{out['search_s']:.2f}", f"{wall:.2f}", "-", "-", f"{rand:.4f}", f"{naive:.4f}", "yes" if wall <= 120 else "NO"]
            all_ok &= wall <= 120
            rows.append(syn_row)
            print("\t".join(str(x) for x in syn_row), flush=True)
    headers = ["scenario", "devices", "ours cost_s", "ours search_s", "ours wall_s (CLI)", "DT-FM ref cost_s", "DT-FM CPU s/seed", "random mean cost_s", "naive cost_s", "target met"]
    table = markdown_table(headers, rows)
    print(table)
    load = os.getloadavg()
    notes = (
        f"`swarm plan --json --seed 0 --time-budget-s {args.time_budget_s:g}` per scenario (synthetic: "
        f"{args.synthetic_budget_s:g} s budget, target: planned within 120 s wall). Costs: DT-FM model "
        "(DP + 2 x PP, seconds per iteration), recomputed from the printed plan as a fixed assignment. "
        "DT-FM ref: best of three seeds of DT-FM's own scheduler (dtfm_reference.json; case 2's provable "
        "optimum is 31.634). Random: mean over 5 random balanced partitions, each with its best order and "
        "matchings. Naive: stage j = the j-th block of devices in file order, pipelines in list order. "
        f"Shuffled: devices listed in a random order (seed 1). Load average at the end: {load[0]:.1f} "
        "(the machine is shared; search_s is wall time)."
    )
    if not args.no_record:
        record("Scheduler: swarm plan vs DT-FM (5 scenarios, shuffled ids, 1,024 devices)", table, notes)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
