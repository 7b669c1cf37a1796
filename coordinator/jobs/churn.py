"""Churn decisions of the job loop, as pure functions over plain job data (no I/O, no clock).

Two fences keep a job's workers in step when its plan changes (see node/training/membership.py
for the worker's side):

**Start fence** (every attempt). A worker that has set up its stage reports ``ready``; the
coordinator answers ``start`` only once every worker of the attempt has reported ``ready``
(:func:`all_ready`). So no tensor of a new attempt is sent before every receiver runs that
attempt, and a survivor still on the old attempt cannot refuse it.

**Replica-loss fence** (a job with data-parallel pipelines loses a node while at least one
pipeline is whole). Pipeline ``r`` is the ``r``-th node of every stage; a pipeline with a lost
node cannot run, the others (``live``) can. The job is not rolled back:

1. the coordinator opens a fence (:func:`open_fence`): every progress reply of the attempt says
   ``fence``; averaging between replicas is skipped from then on (each pipeline uses its own
   gradients), so nobody waits for the dead replica;
2. each live worker reports ``fence`` at its next step boundary ``b`` (before starting step
   ``b``; a worker waiting for an input of step ``b`` reports ``b`` too); stage 0 of a pipeline
   does not start the next step until the switch step is known, and every other stage can only
   run the steps stage 0 starts;
3. once every live worker reported, the switch step ``S`` is the largest of their boundaries
   (:func:`on_fence_report`): every live worker runs up to ``S`` (those that stopped earlier
   carry on); the live workers of a stage, when 2+ (:func:`live_members`, sent in the replies),
   average their parameters among themselves there, so what each pipeline learnt alone since the
   loss is kept whichever upload the re-plan resumes from; each saves and uploads a full
   checkpoint at ``S`` and reports ``fenced``;
4. once every live worker is ``fenced`` (:func:`fence_complete`), the job is re-planned from
   step ``S`` with the checkpoint just taken: the surviving pipelines carry the whole batch
   (each takes ``batch / replicas`` of it, so the effective batch is unchanged); the nodes of
   the broken pipeline that are still online are idle nodes to the planner like any other.

**Holder-loss fence** (a one-pipeline job loses a holder of a shared stage, a helper or the
worker it helped, while the stage's other holder lives: :func:`holder_loss`). The same steps 1-4
over the one pipeline, without the lost holder's worker; the replies also name the lost share
(``fence_dropped``: its stage and which micro-batches it ran there). The step in flight cannot
finish as it was planned (the lost holder's micro-batches are stuck with it), so every worker
drops them: a wait for one of them ends once the worker knows the fence, a send to the lost holder
is skipped, and the step finishes with the micro-batches that went through (node/training/worker.py).
Nothing is rolled back: the re-plan at ``S`` runs the pipeline without the lost node (event
``replica_dropped`` with ``helper`` true). A worker fails instead only when the fence comes later
than its peer timeout (the coordinator's node timeout, 6 s by default, is shorter than a job's
``--peer-timeout-s``, 30 s).

**Fences that lose no node** (growth, helper and re-balance fences, below: :func:`fence_all_live`)
differ in step 1: replicas keep averaging their gradients up to ``S``, since every member of every
averaging group runs to it. A worker whose round waits for a member of another pipeline, whose
stage 0 stands at a boundary until ``S`` is known, reports its next boundary before it enters the
round (node/training/membership.py ``before_round``), so ``S`` never waits for the round; the
steps up to ``S`` are then those of a job without a fence (tests/multiproc/training/
test_train_helper.py: a two-pipeline job's losses stay the single-process reference's).

**Growth fence** (a job running with fewer pipelines than ``--replicas`` asked for, after a
replica loss or a degraded re-plan, while idle nodes could hold more: :func:`growth_target`).
The same steps 1-4 with every pipeline live and nobody lost; the re-plan at ``S`` keeps every
running worker in place and adds pipelines on the idle nodes with the same layer split
(coordinator/jobs/planning.py ``grow_plan``). The batch is split over more pipelines from ``S``
on; nothing is rolled back.

**State at the switch step** (every fence's re-plan: :func:`state_sources`). The coordinator
names, in each new worker's assignment, the node of the live worker whose upload at ``S`` it
resumes that worker's layers from (wherever the re-plan put that node), with the SHA-256 of the
uploaded ``weights.safetensors`` and ``optimizer.safetensors``; that node's own assignment lists
who may copy them (``state_serves``). The source loads its files from its disk; the others copy
them from it peer to peer, refusing a file whose hash differs, and fall back to the
coordinator's copy on any failure (node/training/state_copy.py). Each worker's ``ready`` report
says where its state came from; when the grown attempt starts the event ``replica_added`` names
the added nodes with ``state_from`` ("peer" only when every added worker copied from a live
replica: :func:`summarize_state_from`) and ``state_bytes``.

**Re-balance fence** (a node is seen far below its planned speed and re-planning with the seen
speeds predicts a much faster step: coordinator/jobs/rebalance.py). The same steps 1-4 with
every pipeline live and nobody lost; the re-plan at ``S`` runs the planner with the seen speeds,
so layer boundaries move (the slow node holds fewer layers). Workers whose layers changed load
them from the checkpoint at ``S`` (the coordinator's copy, assembled from every stage's upload);
nothing is rolled back.

**Outrun fence**: when every live worker already delivered its final checkpoint (the replica
was lost in the last steps and noticed after the survivors ended: :func:`fence_outrun`), the
job finishes with the live pipelines' final checkpoints; nothing is re-planned.

**Why every live worker's boundary, not only stage 0's.** ``S`` must never be below a live
worker's position: a worker past ``S`` cannot stop there (its weights hold the steps after
``S``), and whatever it did from ``S`` on is done again by the new attempt. Stage 0's boundary
bounds its pipeline only while the coordinator knows where stage 0 is, and a worker's position
is only known from its own report: the workers train on through a coordinator outage
(node/training/membership.py), so after a restart the coordinator's picture of the job (its
progress rows, a report re-sent late) can lag the workers by many steps, and a report that
raced a fence's opening may come from an earlier boundary. Waiting for a report from every live
worker costs at most one assignment poll or switch-step poll (under 1 s): a worker blocked on an
input polls during a fence (``SWITCH_POLL_S``). Once every live worker reported, stage 0s stand
still at their boundaries (they wait for ``S``) and every other stage can only run the steps
they started, so nobody passes the max. A ``fence`` report beyond ``S`` after it is set breaks
that reasoning (it should not happen): the fence is marked ``overrun`` and the job falls back to
its last checkpoint at once (:func:`fence_overrun`; ``cause`` ``fence_overrun``, work done twice,
not a rollback by design) instead of re-planning from a checkpoint labelled ``S`` that holds later
weights; the worker past ``S`` neither stops at ``S`` nor runs on: it waits at its boundary
until the re-plan stops it.

Nothing is done twice: steps ``< S`` ran in the old attempt, steps ``>= S`` run in the new one.
The step in flight when the replica died and the steps up to ``S`` (usually 0-2) run without
the dead pipeline's share of the batch. A live worker lost during the fence removes its
pipeline from ``live``; with no live pipeline left the job falls back to a re-plan from its last
complete checkpoint.
"""

from __future__ import annotations

from typing import Any

from coordinator.jobs.helpers import pipeline_of


def key(stage: int, replica: int) -> str:
    return f"{stage}:{replica}"


def workers(assignments: list[dict[str, Any]]) -> set[str]:
    return {key(a["stage"], a["replica"]) for a in assignments}


def all_ready(assignments: list[dict[str, Any]], ready: set[str]) -> bool:
    """The start fence: every (stage, replica) of the attempt reported ``ready``."""
    need = workers(assignments)
    return bool(need) and need <= ready


def live_pipelines(assignments: list[dict[str, Any]], lost_nodes: set[str]) -> list[int]:
    """Pipelines (replica indices) none of whose nodes is lost, ascending; a helper of a stage
    (coordinator/jobs/helpers.py) counts in the pipeline it helps."""
    broken = {pipeline_of(a) for a in assignments if a["node_id"] in lost_nodes}
    return sorted({pipeline_of(a) for a in assignments} - broken)


def holder_loss(assignments: list[dict[str, Any]], lost_nodes: set[str]) -> list[dict[str, Any]] | None:
    """A one-pipeline job whose lost nodes each shared a stage with a holder still alive (a helper
    lost, or the worker it helped): the shares they ran, ``{"node", "stage", "replica",
    "share_index", "share_count"}`` each; None otherwise (a stage lost whole, or several pipelines:
    losing a holder there drops its pipeline, :func:`live_pipelines`).

    Such a pipeline carries on (the **holder-loss fence**, module docstring): the survivor of the
    stage holds its whole state, so only the lost holder's micro-batches of the steps in flight are
    gone. Every worker of the pipeline drops them (a wait for one of them ends once the fence is
    known, a send to the lost holder is skipped) and finishes its step without them; the step
    misses those micro-batches' share of the batch, as a replica-loss fence's in-flight step misses
    the dead pipeline's."""
    if not lost_nodes or not assignments or max(a["num_replicas"] for a in assignments) != 1:
        return None
    out = []
    for a in assignments:
        if a["node_id"] not in lost_nodes:
            continue
        count = int(a.get("share_count", 1))
        if count < 2 or not any(b["stage"] == a["stage"] and b["node_id"] not in lost_nodes for b in assignments):
            return None
        out.append({"node": a["node_id"], "stage": a["stage"], "replica": a["replica"],
                    "share_index": int(a.get("share_index", 0)), "share_count": count})
    return out or None


def open_fence(*, attempt: int, assignments: list[dict[str, Any]], live: list[int], lost: list[str],
               at_s: float, grow_to: int = 0, rebalance: dict[str, Any] | None = None,
               helpers: dict[str, Any] | None = None, dropped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A fence over the ``live`` pipelines of ``attempt`` (JSON-able; stored with the job): a
    replica-loss fence, or with ``grow_to`` a growth fence (no node lost; the re-plan at the
    switch step adds pipelines on idle nodes, up to ``grow_to`` replicas), or with ``rebalance``
    a re-balance fence (no node lost; the re-plan at the switch step uses the seen speeds in
    ``rebalance["tflops"]``: coordinator/jobs/rebalance.py), or with ``helpers`` a helper fence
    (``{"stage", "nodes": [node id per pipeline]}``: the re-plan keeps every worker in place and
    adds those nodes as helpers of the stage, coordinator/jobs/helpers.py), or with ``dropped``
    a holder-loss fence (:func:`holder_loss`: the lost holders' workers are not waited for)."""
    gone = {d["node"] for d in dropped or ()}
    kept = [a for a in assignments if pipeline_of(a) in live and a["node_id"] not in gone]
    return {
        "attempt": attempt, "live": sorted(live), "lost": sorted(lost), "opened_at": at_s, "grow_to": int(grow_to),
        "rebalance": rebalance, "helpers": helpers, "dropped": list(dropped or ()),
        "workers": sorted(key(a["stage"], a["replica"]) for a in kept),
        "stage0": sorted(key(0, a["replica"]) for a in kept if a["stage"] == 0) if gone else sorted(key(0, r) for r in live),
        "ready": {}, "done": {}, "switch_step": 0,
    }


def shrink_fence(fence: dict[str, Any], assignments: list[dict[str, Any]], lost_nodes: set[str]) -> dict[str, Any]:
    """The fence without the pipelines that lost a node since it opened (may leave none live); the
    holders a holder-loss fence already dropped break nothing."""
    absorbed = {d["node"] for d in fence.get("dropped") or ()}
    live = [r for r in live_pipelines(assignments, set(lost_nodes) - absorbed) if r in fence["live"]]
    if live == fence["live"]:
        return fence
    pipeline = {key(a["stage"], a["replica"]): pipeline_of(a) for a in assignments}
    keep = lambda k: pipeline.get(k, int(k.split(":")[1])) in live  # noqa: E731
    return {**fence, "live": live, "lost": sorted(set(fence["lost"]) | (lost_nodes & {a["node_id"] for a in assignments})),
            "workers": [k for k in fence["workers"] if keep(k)], "stage0": [k for k in fence["stage0"] if keep(k)],
            "ready": {k: v for k, v in fence["ready"].items() if keep(k)},
            "done": {k: v for k, v in fence["done"].items() if keep(k)}}


def on_fence_report(fence: dict[str, Any], *, stage: int, replica: int, state: str, step: int) -> dict[str, Any]:
    """The fence after a live worker's ``fence`` (at boundary ``step``) or ``fenced`` (at the
    switch step) report; reports of workers outside the fence change nothing."""
    k = key(stage, replica)
    if k not in fence["workers"]:
        return fence
    fence = {**fence, "ready": dict(fence["ready"]), "done": dict(fence["done"])}
    if state == "fence":
        fence["ready"][k] = max(int(step), fence["ready"].get(k, 0))
        if fence["switch_step"] and step > fence["switch_step"]:
            fence["overrun"] = sorted(set(fence.get("overrun") or []) | {k})  # see the module docstring
    elif state == "fenced" and fence["switch_step"] and step == fence["switch_step"]:
        fence["done"][k] = int(step)
    if not fence["switch_step"] and fence["stage0"] and all(w in fence["ready"] for w in fence["workers"]):
        # the furthest live worker: nobody is past it (module docstring: not only stage 0's)
        fence["switch_step"] = max(fence["ready"][w] for w in fence["workers"])
    return fence


def fence_all_live(fence: dict[str, Any] | None) -> bool:
    """A fence that lost no node (a growth, helper or re-balance fence, and no node lost since it
    opened): every member of every averaging group runs to the switch step, so replicas keep
    averaging their gradients through it (a worker reports its next boundary before it waits in a
    round: node/training/worker.py), and its steps are the ones the job would have made without
    it. A replica-loss fence: each pipeline steps with its own gradients (its groups have a dead
    member)."""
    return fence is not None and not fence.get("lost")


def live_members(fence: dict[str, Any] | None, assignments: list[dict[str, Any]], stage: int) -> list[int]:
    """A fence that lost a node: the positions, in ``stage``'s averaging order (its workers by
    replica index: the rendezvous' order, coordinator/jobs/service.py ``rendezvous``), of its
    workers in the fence's live pipelines; [] for no fence, a fence that lost none, or fewer than
    two live members (nothing to average).

    At the switch step these members average their parameters before they save (node/training/
    worker.py ``_fence_stop``): since the loss each live pipeline stepped with its own gradients
    (a round with a dead member fails; the coordinator notices the loss only after the node
    timeout), and the re-plan resumes the stage from one survivor's upload, so without the merge
    the other survivors' steps since the loss would count for nothing."""
    if fence is None or fence_all_live(fence):
        return []
    members = sorted((a for a in assignments if a["stage"] == stage), key=lambda a: a["replica"])
    lost = set(fence["lost"])
    out = [i for i, a in enumerate(members) if pipeline_of(a) in fence["live"] and a["node_id"] not in lost]
    return out if len(out) >= 2 else []


def fence_overrun(fence: dict[str, Any]) -> bool:
    """A live worker reported a boundary past the switch step: the fence cannot re-plan from ``S``
    without doing that worker's steps after ``S`` twice (on top of themselves); the job falls back
    to its last complete checkpoint."""
    return bool(fence.get("overrun"))


def fence_complete(fence: dict[str, Any]) -> bool:
    return bool(fence["workers"]) and all(k in fence["done"] for k in fence["workers"])


def fence_outrun(fence: dict[str, Any], finals: set[str]) -> bool:
    """The live pipelines finished the job before they could stop at a switch step: every worker
    of the fence delivered its final checkpoint (``finals``: ``"stage:replica"`` keys).

    A node is lost only after its silence outlasts the node timeout, and a survivor whose
    averaging partner died runs on alone meanwhile, so a replica lost in the job's last steps is
    often noticed after the survivors ran their last step and exited. Their last boundary is
    behind them: no switch step can come and the fence would time out into a rollback. Their
    final checkpoints (every replica uploads its final weights) are the job's result instead."""
    return bool(fence["workers"]) and all(k in finals for k in fence["workers"])


# Why a re-plan rolled a job back to a checkpoint (``cause`` of its ``replan`` event,
# coordinator/jobs/service.py ``_recover``); only these redo steps by design: a stage lost with
# no replica to carry on (``stage_lost``), a node found computing wrong results (``wrong_result``:
# back to before its first bad step), and a node accused of it once (``disputed_check``: back to
# before the accused step, coordinator/jobs/disputing.py). The others (``fence_timeout``, ``fence_replan_failed``,
# ``fence_overrun``, ``peer_failure``, ``not_started``) are fallbacks where a fence or a start
# should have lost nothing.
ROLLBACK_BY_DESIGN = frozenset({"stage_lost", "wrong_result", "disputed_check"})


def rollback_attempts(events: list[dict[str, Any]]) -> dict[int, int]:
    """attempt -> resume step of the attempts a re-plan started by rolling back to a checkpoint by
    design (:data:`ROLLBACK_BY_DESIGN`), from the job's ``replan`` events: ``_recover``'s, or after
    waiting for a node the one that ends the wait (``waited``; its cause is the ``waiting`` event's
    before it). A fence's re-plan (``fence``: no rollback) is not one."""
    out: dict[int, int] = {}
    cause = ""
    for e in events:
        f = e.get("fields") or {}
        if e.get("kind") != "replan" or f.get("fence") or "attempt" not in f:
            continue
        if f.get("waiting"):
            cause = f.get("cause") or ""
            continue
        if (cause if f.get("waited") else f.get("cause")) in ROLLBACK_BY_DESIGN:
            out[int(f["attempt"])] = int(f.get("resume_step") or 0)
    return out


def split_repeats(doers: dict[tuple[int, int], set[int]], rollbacks: dict[int, int]) -> tuple[list[int], list[int]]:
    """(steps a rollback redid, steps done twice otherwise) of the steps done by workers of more
    than one attempt: ``doers``: (step, stage) -> the attempts whose workers reported it;
    ``rollbacks``: :func:`rollback_attempts`.

    A stage lost without a replica rolls the job back to its last complete checkpoint: the steps
    from there are done again by design. A step redone between two attempts ``a < b`` that did it
    is such a redo when an attempt in ``(a, b]`` rolled back to a step at most it; otherwise
    (a fence's switch, a fence that timed out into a rollback, a late report counted in the wrong
    attempt) it is work done twice that the protocol promises never happens. A step of a stage counts as the latter if any of its redos is."""
    redone: set[int] = set()
    twice: set[int] = set()
    for (step, _stage), attempts in doers.items():
        order = sorted(attempts)
        if len(order) < 2:
            continue
        by_rollback = all(any(a < r <= b and rollbacks[r] <= step for r in rollbacks)
                          for a, b in zip(order, order[1:]))
        (redone if by_rollback else twice).add(int(step))
    return sorted(redone - twice), sorted(twice)


def replica_counts(num_replicas: int, batch_size: int, micro_batch_size: int) -> list[int]:
    """Replica counts a re-plan may fall back to, most first: ``num_replicas`` down to 1, each
    splitting the global batch into whole micro-batches (the effective batch never changes)."""
    return [k for k in range(num_replicas, 0, -1) if batch_size % k == 0 and (batch_size // k) % micro_batch_size == 0]


def growth_target(*, current: int, requested: int, stages: int, idle_nodes: int, batch_size: int,
                  micro_batch_size: int) -> int | None:
    """The replica count a running job should grow back to, or None.

    A job runs with fewer data-parallel pipelines than it asked for (``requested``) after a
    replica-loss fence or a re-plan that degraded it. When idle online nodes could hold at least
    one more whole pipeline (``stages`` nodes each), the answer is the most replicas, up to
    ``requested``, that the idle nodes allow and that split the global batch into whole
    micro-batches (:func:`replica_counts`). The job then grows through a fence like a replica
    loss (no rollback): every pipeline stops at a switch step and checkpoints, and the re-plan
    from there includes the new nodes."""
    if requested <= current or stages <= 0:
        return None
    fits = [k for k in replica_counts(requested, batch_size, micro_batch_size)
            if current < k and (k - current) * stages <= idle_nodes]
    return max(fits) if fits else None


def state_sources(*, old: list[dict[str, Any]], new: list[dict[str, Any]], copies: dict[int, dict[str, Any]],
                  step: int) -> tuple[list[dict[str, Any] | None], list[list[dict[str, Any]]]]:
    """Where each worker of a fence's re-plan (``new``, in order) copies its stage's state at the
    switch ``step`` from, peer to peer, and what each one serves to whom.

    ``copies``: stage -> ``{"replica", "weights_sha256", "optimizer_sha256"}`` of the checkpoint
    copy the coordinator holds for that stage of the old attempt (``old``). A new worker's source
    is the node of an old worker whose copy that is, holding the same layers, and which has a
    place in the new plan (any stage: the planner does not keep nodes in place; its peer server
    serves the files it saved). Preference: the worker's own node (it loads its own files), else
    the first such node. Without one, or without the optimizer's hash (an old node's checkpoint:
    nothing to verify a copy against), None: from the coordinator.

    Returns (sources, serves): ``sources[i]`` for ``new[i]`` (``{"node_id", "address", "stage",
    "step", "weights_sha256", "optimizer_sha256"}`` or None); ``serves[i]`` what ``new[i]``'s
    node may send (``[{"stage", "step", "node_ids"}]``, the same on each of its assignments)."""
    layers = lambda x: (x["first_layer"], x["last_layer_excl"])  # noqa: E731
    address = {a["node_id"]: a["address"] for a in new}
    holders = []  # (old worker, its copy's hashes) whose node is in the new plan
    for s, c in sorted(copies.items()):
        o = next((o for o in old if o["stage"] == s and o["replica"] == c["replica"]), None)
        if o is not None and o["node_id"] in address and c.get("weights_sha256") and c.get("optimizer_sha256"):
            holders.append((o, c))
    sources: list[dict[str, Any] | None] = []
    to: dict[tuple[str, int], list[str]] = {}  # (source node, old stage) -> nodes copying from it
    for a in new:
        fit = [(o, c) for o, c in holders if layers(o) == layers(a)]
        fit.sort(key=lambda oc: oc[0]["node_id"] != a["node_id"])  # our own copy first
        if not fit:
            sources.append(None)
            continue
        o, c = fit[0]
        sources.append({"node_id": o["node_id"], "address": address[o["node_id"]], "stage": o["stage"],
                        "step": int(step), "weights_sha256": c["weights_sha256"],
                        "optimizer_sha256": c["optimizer_sha256"]})
        if o["node_id"] != a["node_id"]:
            to.setdefault((o["node_id"], o["stage"]), []).append(a["node_id"])
    serves = [[{"stage": s, "step": int(step), "node_ids": sorted(ids)} for (n, s), ids in sorted(to.items())
               if n == a["node_id"]] for a in new]
    return sources, serves


def summarize_state_from(reports: dict[str, tuple[str, int]], added_keys: list[str]) -> tuple[str, int]:
    """``("peer"|"coordinator", bytes)`` for the ``replica_added`` event: "peer" when every added
    worker (``"stage:replica"`` keys) copied its state from a live replica, else "coordinator";
    bytes: what the added workers copied over the network. ``reports``: key -> (state_from, bytes)
    from their ``ready`` reports."""
    got = [reports.get(k, ("coordinator", 0)) for k in added_keys]
    source = "peer" if got and all(s == "peer" for s, _ in got) else "coordinator"
    return source, sum(int(b) for _, b in got)


def checkpoint_keepers(assignments: list[dict[str, Any]]) -> dict[str, str]:
    """``"stage:replica"`` -> node id of the worker that keeps a second copy of that worker's
    periodic checkpoints (node/training/kept.py), for the workers whose upload is the
    coordinator's copy (replica 0: the others upload only their meta).

    The keeper is the next stage's replica-0 node (stage + 1, wrapping to stage 0), so a stage
    and its copy are on different nodes and one lost node never takes both; the next stage's
    node is already a neighbour of the pipeline. Tie-breaks: a node holding that stage too (it
    cannot be its own keeper) passes to the stage after it; a one-stage job uses replica 1, 2,
    ... of the same stage; with no other node (a 1 x 1 job) there is no keeper."""
    by = {(int(a["stage"]), int(a["replica"])): a["node_id"] for a in assignments}
    stages = sorted({s for s, _ in by})
    out: dict[str, str] = {}
    for (s, r), node in sorted(by.items()):
        if r != 0:
            continue
        i = stages.index(s)
        ring = [by.get((stages[(i + k) % len(stages)], 0)) for k in range(1, len(stages))]
        ring += [by[(s, rr)] for rr in sorted(rr for ss, rr in by if ss == s and rr != 0)]
        keeper = next((n for n in ring if n is not None and n != node), None)
        if keeper is not None:
            out[key(s, r)] = keeper
    return out


def with_keepers(assignments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``assignments`` with each one's ``checkpoint_keeper`` (``{"node_id", "address"}`` or None)
    and ``keeps`` (``[{"node_id", "address", "stage", "replica"}]``: the workers whose checkpoints
    its node keeps) from :func:`checkpoint_keepers`."""
    keepers = checkpoint_keepers(assignments)
    address = {a["node_id"]: a["address"] for a in assignments}
    out = []
    for a in assignments:
        k = keepers.get(key(a["stage"], a["replica"]))
        keeps = [{"node_id": o["node_id"], "address": o["address"], "stage": o["stage"], "replica": o["replica"]}
                 for o in assignments if keepers.get(key(o["stage"], o["replica"])) == a["node_id"]]
        out.append({**a, "checkpoint_keeper": {"node_id": k, "address": address[k]} if k else None, "keeps": keeps})
    return out


def keeper_sources(*, bad: dict[int, dict[str, Any]], new: list[dict[str, Any]],
                   step: int) -> tuple[list[dict[str, Any] | None], list[list[dict[str, Any]]]]:
    """Where the workers of a re-plan from the checkpoint at ``step`` take the state of the stages
    whose coordinator copy is missing or corrupt (``bad``: stage -> ``{"keeper", "first_layer",
    "last_layer_excl", "weights_sha256", "optimizer_sha256"}`` as recorded when the copy was
    uploaded): from that stage's checkpoint keeper, when it is in the new plan and a new worker
    holds the same layers. Same shape as :func:`state_sources`; each source is ``required`` (the
    coordinator has no copy to fall back to)."""
    old = [{"stage": s, "replica": 0, "node_id": b["keeper"], "first_layer": b["first_layer"],
            "last_layer_excl": b["last_layer_excl"]} for s, b in bad.items() if b.get("keeper")]
    copies = {s: {"replica": 0, "weights_sha256": b.get("weights_sha256"),
                  "optimizer_sha256": b.get("optimizer_sha256")} for s, b in bad.items()}
    sources, serves = state_sources(old=old, new=new, copies=copies, step=step)
    return [dict(s, required=True) if s else None for s in sources], serves
