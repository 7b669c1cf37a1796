"""``swarm plan``: plan a training job offline over a cluster file (DT-FM scenario format)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import InvalidRequestError, SwarmError


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanArgs:
    cluster_path: Path
    job_path: Path | None
    seed: int
    time_budget_s: float
    dp: int | None
    pp: int | None
    as_json: bool

    def __post_init__(self) -> None:
        if not self.time_budget_s > 0:
            raise InvalidRequestError("--time-budget-s must be > 0")
        for name in ("dp", "pp"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InvalidRequestError(f"--{name} must be >= 1")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan a training job over a cluster file (stages, groups, pipeline order)",
        description=(
            "Run the scheduler offline. The cluster file holds delay_s and bandwidth_Bps matrices "
            "(and optionally devices with tflops/memory_bytes, d_dp/d_pp and a model/job object), "
            "as in shared/bench/scheduler/scenarios/*.json."
        ),
    )
    p.add_argument("--cluster", required=True, type=Path, help="cluster/scenario JSON file")
    p.add_argument("--job", type=Path, default=None, help="job JSON (model shape); default: the cluster file's 'model'")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--time-budget-s", type=float, default=60.0, help="search time limit in seconds (default 60)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: the file's d_dp, else searched)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the file's d_pp, else searched)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = PlanArgs(
            cluster_path=args.cluster,
            job_path=args.job,
            seed=args.seed,
            time_budget_s=args.time_budget_s,
            dp=args.dp,
            pp=args.pp,
            as_json=args.json,
        )
        return _run(cfg)
    except SwarmError as e:
        print(f"swarm plan: {e}", file=sys.stderr)
        return 2


def _run(cfg: PlanArgs) -> int:
    from swarm.scheduling import JobShape, load_cluster_file, plan_training

    cluster, job = load_cluster_file(cfg.cluster_path)
    if cfg.job_path is not None:
        try:
            job = JobShape.from_json(json.loads(cfg.job_path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"cannot read job file {cfg.job_path}: {e}") from None
    if job is None:
        raise InvalidRequestError(f"{cfg.cluster_path} has no 'model' or 'job' object; add one or pass --job FILE.json")
    plan = plan_training(cluster, job, seed=cfg.seed, time_budget_s=cfg.time_budget_s, dp=cfg.dp, pp=cfg.pp)
    if cfg.as_json:
        print(json.dumps(plan.to_json()))
        return 0
    print(f"cluster {cluster.name or cfg.cluster_path.name}: {cluster.num_devices} devices, plan {plan.d_dp} x {plan.d_pp} (dp x pp)")
    label = "DT-FM comm cost" if plan.objective == "dtfm_comm" else "predicted iteration time"
    print(f"{label}: {plan.cost_s:.4f} s  (DP {plan.dp_s:.4f} + 2 x PP {plan.pp_s:.4f}"
          + (f" + compute {plan.compute_s:.4f}" if plan.compute_s else "") + f"), search {plan.search_s:.2f} s")
    boundaries = plan.breakdown.get("boundary_s", [])
    for k, st in enumerate(plan.stages):
        extra = f" compute/mb {st.compute_s:.4g}s" if st.compute_s is not None else ""
        hop = f"  -> next hop {boundaries[k]:.4g}s" if k < len(boundaries) else ""
        print(f"  stage {k}: layers {st.layers[0]}-{st.layers[1] - 1} dp {st.dp_s:.4g}s{extra} devices {list(st.devices)}{hop}")
    return 0
