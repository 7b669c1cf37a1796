"""``swarm plan``: plan a training job offline over a cluster file (DT-FM scenario format).

``--compression SPEC`` prices the pipeline boundaries at that codec: activations forward and
gradients backward at :meth:`CodecSpec.forward_bytes_per_value` (AQ-SGD's steady state, the
visits after a sample's first) and :meth:`CodecSpec.backward_bytes_per_value`. An uncompressed
value costs the job's own ``act_bytes_per_value`` (fp16 = 2 in the DT-FM scenario files), so
``--compression none`` (the default) plans exactly the file's job. A file's ``c_pp_bytes`` (a
measured or quoted boundary message size) is scaled by the same ratio as the bytes per value.
The JSON adds ``boundary_bytes_per_step``: the bytes one stage boundary carries per training
step, over all replicas, each way: ``global_batch_seqs x seq_len x hidden_size x bytes/value``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    compression: str = "none"

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
            "as in examples/cluster-datacenter-spot.json."
        ),
    )
    p.add_argument("--cluster", required=True, type=Path, help="cluster/scenario JSON file")
    p.add_argument("--job", type=Path, default=None, help="job JSON (model shape); default: the cluster file's 'model'")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--time-budget-s", type=float, default=60.0, help="search time limit in seconds (default 60)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: the file's d_dp, else searched)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: the file's d_pp, else searched)")
    p.add_argument("--compression", default="none",
                   help="boundary codec to price, e.g. aqsgd:fw=2,bw=4 (default none: the job's own dtype)")
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
            compression=args.compression,
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
    codec = _parse_codec(cfg.compression)
    job, boundary = priced(job, codec)
    plan = plan_training(cluster, job, seed=cfg.seed, time_budget_s=cfg.time_budget_s, dp=cfg.dp, pp=cfg.pp)
    if cfg.as_json:
        print(json.dumps(plan.to_json() | {"compression": str(codec), "boundary_bytes_per_step": boundary}))
        return 0
    print(f"cluster {cluster.name or cfg.cluster_path.name}: {cluster.num_devices} devices, plan {plan.d_dp} x {plan.d_pp} (dp x pp)")
    label = "DT-FM comm cost" if plan.objective == "dtfm_comm" else "predicted iteration time"
    print(f"codec {codec}: one stage boundary carries {boundary['forward'] / 1e6:,.1f} MB forward, "
          f"{boundary['backward'] / 1e6:,.1f} MB backward per step")
    print(f"{label}: {plan.cost_s:.4f} s  (DP {plan.dp_s:.4f} + 2 x PP {plan.pp_s:.4f}"
          + (f" + compute {plan.compute_s:.4f}" if plan.compute_s else "") + f"), search {plan.search_s:.2f} s")
    boundaries = plan.breakdown.get("boundary_s", [])
    for k, st in enumerate(plan.stages):
        extra = f" compute/mb {st.compute_s:.4g}s" if st.compute_s is not None else ""
        hop = f"  -> next hop {boundaries[k]:.4g}s" if k < len(boundaries) else ""
        print(f"  stage {k}: layers {st.layers[0]}-{st.layers[1] - 1} dp {st.dp_s:.4g}s{extra} devices {list(st.devices)}{hop}")
    return 0


def _parse_codec(text: str):
    from swarm.compression.spec import CodecSpec
    from swarm.errors import ConfigError

    try:
        return CodecSpec.parse(text)
    except ConfigError as e:
        raise ConfigError(f"--compression: {e}") from None


def priced(job, codec) -> tuple:
    """(``job`` with its boundary bytes priced at ``codec``, boundary bytes per step each way).

    An uncompressed value keeps the job's own size, so ``none`` returns the same numbers."""
    raw_fw = job.act_bytes_per_value
    raw_bw = job.act_grad_bytes_per_value or raw_fw
    rows = job.micro_batch_seqs * job.seq_len  # values per channel of one micro-batch (g=channel scales)
    fw = codec.forward_bytes_per_value(raw_bytes=raw_fw, rows=rows)
    bw = codec.backward_bytes_per_value(raw_bytes=raw_bw, rows=rows)
    changes = {"act_bytes_per_value": fw, "act_grad_bytes_per_value": bw}
    if job.c_pp_bytes is not None:  # a quoted message size: scale it like the bytes per value
        c_bw = job.c_pp_backward_bytes if job.c_pp_backward_bytes is not None else job.c_pp_bytes * (raw_bw / raw_fw)
        changes |= {"c_pp_bytes": job.c_pp_bytes * (fw / raw_fw), "c_pp_backward_bytes": c_bw * (bw / raw_bw)}
    values = job.global_batch_seqs * job.seq_len * job.hidden_size  # one boundary, all replicas, one step
    return dataclasses.replace(job, **changes), {"forward": values * fw, "backward": values * bw}
