"""Helper replicas of the slowest stage (issue 14): a node that joins a running job later is added,
at a step boundary, as a new replica of its slowest stage. Pure: plain job data in and out.

Why not a whole pipeline: a growth fence (coordinator/jobs/churn.py) needs one idle node per
stage. A single volunteer can still shorten every step if it takes half the work of the stage
that limits the step. So it joins that stage as a **helper** of a pipeline:

- **Shares.** Pipeline ``r``'s micro-batches at stage ``s`` are split by index: its own worker
  (share 0) runs the micro-batches ``m`` with ``m % 2 == 0``, the helper (share 1) the odd ones.
  Each runs the stage's 1F1B (or GPipe) schedule filtered to its micro-batches; a filtered
  schedule only drops ordering edges of a deadlock-free one, so it cannot deadlock.
- **Routing.** The neighbour stages of pipeline ``r`` send micro-batch ``m`` to holder
  ``m % 2`` (``prev_holders`` / ``next_holders`` of their assignments, in share order), with one
  boundary codec per link (AQ-SGD keeps m(x) per sample and link: a sample that lands on the
  other holder in a later epoch is sent in full once, as a first visit is).
- **Averaging.** The helper joins the stage's averaging group (``stage_replicas``). A holder's
  gradient covers its share of the pipeline's micro-batches, so every member of the stage scales
  its gradient by ``holders / pipelines`` before the plain mean: the result is the mean over
  pipelines of each pipeline's whole gradient, as without a helper.
- **Identity.** A helper has a replica index past the pipelines (``num_replicas + r``, unique in
  the job) and ``pipeline`` = ``r`` (whose data order it follows). Reports, checkpoints, the start
  fence and the fences key on ``(stage, replica)`` as for any worker; fences count it in pipeline
  ``r`` (:func:`pipeline_of`): with 2+ pipelines, losing the helper breaks pipeline ``r`` like
  losing any of its nodes, and the fence's re-plan (the planner's, with whole pipelines) leaves it
  out; in a one-pipeline job the stage's other holder carries on alone (a holder-loss fence,
  coordinator/jobs/churn.py ``holder_loss``: the lost holder's micro-batches in flight are
  dropped, nothing is rolled back).
- **State.** At the fence's switch step every live worker saved its stage; the helper copies the
  stage's weights and AdamW state from a live replica peer to peer, verified by hash
  (churn.state_sources, node/training/state_copy.py), and nothing is rolled back.
- **Checks.** Its witnesses and checker are its pipeline's (coordinator/jobs/spotchecks.py): the
  checker of ``(s, r)`` checks every micro-batch of pipeline ``r`` at stage ``s``; a mismatch of
  micro-batch ``m`` accuses the holder of ``m`` (:func:`holder_of`).

When (:func:`pick_stage`): only a job running at its full ``--replicas`` (one that lost a
pipeline grows a whole one back instead), with enough idle nodes for one helper per pipeline (a
helper in one pipeline alone shortens no step: the replicas wait for each other at every
averaging round), and at most one helper per pipeline. The stage is the one whose workers
reported the most compute time per step in the attempt (self-reported: a node that inflates its
figure draws a helper to its stage, which costs the helper's time, not the job's results).

Whether it pays (:func:`predicted_step_s`): a helper halves its stage's compute per step but
adds a gradient all-reduce of the stage every step (between the stage's holders: a new group of
two in a one-pipeline job). The coordinator predicts the step from the attempt's measured step
time, scaled by how the bottleneck stage's compute changes (the pipeline's step follows its
slowest stage), plus the added all-reduce time (:func:`allreduce_s`: float16 gradients over the
slowest measured link between the stage's holders, plus a fixed cost per round); helpers are
added only when that predicts at least :data:`MIN_GAIN` faster steps. On a 2-core box a tiny
model's stage computes in milliseconds and a round costs more than half of it saves, so
bench/helper.py emulates a slower GPU (``SWARM_FAULT slowdown``) to show the gain.
"""

from __future__ import annotations

from typing import Any

SHARES = 2  # a pipeline's worker and its helper
MIN_GAIN = 0.1  # helpers only when they predict a step at least 10% faster
# A hivemind round's fixed cost: 11 ms median for 64 KB between two replicas on a 2-core loopback
# (docs/benchmarks.md, "Gradient averaging round"); real stages serialise megabytes on busy hosts
ROUND_OVERHEAD_S = 0.05
UNKNOWN_LINK_BPS = 12.5e6  # a link not measured yet: assumed 100 Mbit/s


def pipeline_of(a: dict[str, Any]) -> int:
    """The pipeline an assignment works in (its replica, unless it is a helper)."""
    return int(a.get("pipeline", a["replica"]))


def is_helper(a: dict[str, Any]) -> bool:
    return int(a.get("share_index", 0)) > 0


def has_helpers(assignments: list[dict[str, Any]]) -> bool:
    """Whether an attempt's plan has helpers (the planner's re-plans, of whole pipelines, would drop them)."""
    return any(is_helper(a) for a in assignments)


def holder_of(assignments: list[dict[str, Any]], stage: int, pipeline: int, micro_batch: int) -> dict[str, Any] | None:
    """The assignment that runs ``micro_batch`` of ``pipeline`` at ``stage`` (None: no such worker)."""
    holders = [a for a in assignments if a["stage"] == stage and pipeline_of(a) == pipeline]
    for a in holders:
        if micro_batch % int(a.get("share_count", 1)) == int(a.get("share_index", 0)):
            return a
    return None


def share_position(a: dict[str, Any], micro_batch: int) -> int:
    """Where ``micro_batch`` is among the micro-batches its holder ``a`` runs (its report's order)."""
    return micro_batch // int(a.get("share_count", 1))


def pick_stage(*, rows: list[dict[str, Any]], assignments: list[dict[str, Any]], idle: int, requested: int,
               steps_left: int, min_steps_left: int, resume_step: int = 0, micro_batches: int = SHARES) -> int | None:
    """The stage to add helpers to, or None (module doc: when). ``rows``: the attempt's
    per-worker progress (``stage``, ``replica``, ``compute_s``, ``step``); ``idle``: idle nodes;
    ``micro_batches``: per pipeline and step (a helper needs one of its own)."""
    if not assignments or has_helpers(assignments) or micro_batches < SHARES:
        return None
    pipelines = max(a["num_replicas"] for a in assignments)
    if pipelines < requested or idle < pipelines or steps_left < min_steps_left:
        return None
    if len(rows) < len(assignments) or any(r["step"] is None for r in rows):
        return None  # a worker has not reported yet: no speeds to compare
    stages = sorted({a["stage"] for a in assignments})
    if len(stages) < 2:
        return None  # one stage: each pipeline is that stage alone; more pipelines are a growth
    mean = compute_per_step([r for r in rows if r["stage"] in stages], resume_step)
    if len(mean) < len(stages) or max(mean.values()) <= 0:
        return None
    return max(stages, key=lambda s: (mean[s], -s))


def stage_parameters(config, first_layer: int, last_layer_excl: int, *, is_first: bool, is_last: bool) -> int:
    """Parameters a stage holding ``[first_layer, last_layer_excl)`` trains (its gradient's size):
    its layers' share of the model's, the embeddings on the first stage, the output head (a tied
    one is the last stage's own copy) and final norm on the last."""
    h = config.hidden_size
    per_layer = (config.num_parameters(include_embeddings=False) - h * (2 if config.family == "gpt2" else 1)
                 - (0 if config.tie_word_embeddings else config.vocab_size * h)) / max(1, config.num_layers)
    n = per_layer * (last_layer_excl - first_layer)
    if is_first:
        n += config.vocab_size * h + (config.max_position_embeddings * h if config.family == "gpt2" else 0)
    if is_last:
        n += config.vocab_size * h + 2 * h
    return int(n)


def allreduce_s(members: int, num_bytes: float, bandwidth_Bps: float) -> float:
    """A ring all-reduce of ``num_bytes`` among ``members`` (each sends and receives
    2 (n - 1) / n of it) over links of ``bandwidth_Bps``, plus the round's fixed cost; 0 alone."""
    if members < 2:
        return 0.0
    bw = bandwidth_Bps if bandwidth_Bps and bandwidth_Bps > 0 and bandwidth_Bps == bandwidth_Bps else UNKNOWN_LINK_BPS
    return ROUND_OVERHEAD_S + 2 * (members - 1) / members * num_bytes / bw


def predicted_step_s(*, compute_s: dict[int, float], step_s: float, stage: int, pipelines: int,
                     gradient_bytes: float, bandwidth_Bps: float) -> float:
    """The step time predicted with a helper per pipeline at ``stage`` (module doc), from the
    measured ``step_s`` and each stage's measured compute per step (``compute_s``)."""
    before = max(compute_s.values())
    after = dict(compute_s)
    after[stage] = compute_s[stage] / SHARES
    added = allreduce_s(SHARES * pipelines, gradient_bytes, bandwidth_Bps) - allreduce_s(pipelines, gradient_bytes,
                                                                                         bandwidth_Bps)
    return step_s * max(after.values()) / before + added


def compute_per_step(rows: list[dict[str, Any]], resume_step: int) -> dict[int, float]:
    """Each stage's mean compute seconds per step in the attempt, from its per-worker rows (sums)."""
    out: dict[int, list[float]] = {}
    for r in rows:
        steps = max(1, int(r["step"]) - resume_step + 1)
        out.setdefault(r["stage"], []).append(float(r["compute_s"] or 0.0) / steps)
    return {s: sum(v) / len(v) for s, v in out.items()}


def with_helpers(assignments: list[dict[str, Any]], *, stage: int, helpers: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    """``assignments`` (one attempt's, whole pipelines) with a helper at ``stage`` of each pipeline
    in ``helpers`` (pipeline -> ``{"node_id", "address"}``): the helpers' assignments are added
    (``"added": True``) and the stage's workers and their neighbours in those pipelines get their
    shares and holders. Spot-check plans, keepers and state sources are the caller's to add."""
    keep = ("node_id", "address", "stage", "replica", "num_stages", "num_replicas", "first_layer", "last_layer_excl",
            "prev", "next", "stage_replicas")
    out = [{k: a[k] for k in keep} for a in assignments]
    R = max(a["num_replicas"] for a in out)
    peer = lambda a: {"node_id": a["node_id"], "address": a["address"]}  # noqa: E731
    at = {(a["stage"], a["replica"]): a for a in out}
    added = []
    for r, node in sorted(helpers.items()):
        own = at[(stage, r)]
        helper = dict(own, node_id=node["node_id"], address=node["address"], replica=R + r, pipeline=r,
                      share_index=1, share_count=SHARES, added=True)
        own.update(pipeline=r, share_index=0, share_count=SHARES)
        holders = [peer(own), peer(helper)]
        if (stage - 1, r) in at:
            at[(stage - 1, r)]["next_holders"] = holders
        if (stage + 1, r) in at:
            at[(stage + 1, r)]["prev_holders"] = holders
        added.append(helper)
    members = [peer(a) for a in sorted((a for a in out + added if a["stage"] == stage), key=lambda a: a["replica"])]
    for a in out + added:
        a.setdefault("pipeline", a["replica"])
        a.setdefault("added", False)
        if a["stage"] == stage:
            a["stage_replicas"] = members
    return out + added
