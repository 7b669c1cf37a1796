"""The coordinator's side of training spot checks (node/training/spotcheck.py has the protocol).

:func:`verify_plans` (pure) tells each (stage, replica) assignment whom it witnesses and checks:
the checker of (s, r) is (s, (r + 1) mod R); its witnesses are (s - 1, r) and (s + 1, r); the
sampling seed of (s, r) goes to those three and never to (s, r) itself.

:class:`Judge` weighs what comes back with progress reports:

- a check is weighed only when the checker and the checked node ran the same weights for the
  checked step: equal ``param_digest`` (exact bytes), or parameter sketches (``param_sketch``) within
  :data:`SYNC_TOLERANCE` (:func:`weights_distance`: relative L2 distance of the two stages'
  weights). Until the target's report is known the check waits; further apart (a failed
  averaging round: ~1e-2) or missing, it is void (counted as unverifiable), whatever it found.
  Replicas after successful rounds are ~1e-4 apart (fp16 deltas), which moves an honest
  recomputation by far less than the tolerance of the comparison (0.1 relative L2);
- a reported mismatch that the checker's repeated recomputation confirmed, or a checker's
  recomputed loss of the last stage further than ``LOSS_TOLERANCE`` from the loss the checked
  node reported for the same micro-batch, is an **accusation** by the checker, not a verdict: a
  checker may lie (coordinator/jobs/disputes.py has the rules: one checker's word opens a
  dispute, :meth:`Judge.take_disputes`; a second checker convicts);
- replicas whose reported weights stay apart are watched (:data:`APART_STEPS`): replicas average
  their parameters every ``RESYNC_EVERY_STEPS`` steps, so honest replicas are apart only until the
  re-sync after a failed round, and a replica that reports a far sketch voids every check of it.
  With 3+ replicas, one apart from all the others (which agree) through three re-syncs is guilty
  (it misreports its weights, or cannot average with them); with 2 the coordinator cannot tell
  which of the pair it is, and records a ``checks_void`` job event (:meth:`Judge.take_notices`);
- a stage that failed because a neighbour stopped answering blames it; the blame stands when
  the blamed node sent no progress for the job from before the blame until ``peer_timeout_s``
  after it, and did not blame its accuser back meanwhile (a dispute: nobody is quarantined, the
  job re-plans).

A guilty node is quarantined by the caller (JobService), which re-plans the job without it and
resumes from the last complete checkpoint at or before the first bad step.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from swarm.pipeline.averaging import RESYNC_EVERY_STEPS

from coordinator.jobs import binding
from coordinator.jobs.disputes import PROBATION_PROB, Accusation, Accusations, Verdict
from coordinator.jobs.helpers import holder_of, is_helper, pipeline_of, share_position

__all__ = ["Accusation", "Judge", "Verdict", "checks_clause", "verify_plans"]

log = logging.getLogger(__name__)

LOSS_TOLERANCE = 0.1  # nats: the same as node/training/spotcheck.py
# Largest relative L2 distance between the checker's and the checked stage's weights at which a
# check is weighed. Measured between honest replicas of the 2 x 2 test job
# (tests/multiproc/training/test_train_verification.py): after successful averaging rounds and
# the periodic parameter re-sync ~1e-4, after a failed round ~1e-2 and growing. At 3e-3 the
# honest recomputation differs from the checked output by ~3e-3 on a middle stage, a thirtieth of
# the 0.1 tolerance (tests/unit/foundation/test_spotcheck_digest.py), but by up to ~10x the weights'
# distance on the first stage (its embedding): in a 300-step 3 x 2 job on the 2-core box
# (2026-12-02) the largest weighed honest error was 0.024 (output, stage 0), and void ones reached
# 0.138 at distance 0.013; so a quarter of the tolerance at worst, not a thirtieth.
SYNC_TOLERANCE = 3e-3
# Steps a stage's replicas may report weights more than SYNC_TOLERANCE apart before it is
# judged: three parameter re-syncs and the step each takes to apply. Honest replicas drift apart
# only after a failed gradient round and meet at the next re-sync.
APART_STEPS = 3 * RESYNC_EVERY_STEPS + 2


def weights_distance(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Estimated ||w_a - w_b|| / ||w_b|| from two param sketches; inf when either is missing."""
    if not a or len(a) != len(b):
        return float("inf")
    num = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    den = sum(y * y for y in b) ** 0.5
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def same_weights(target: dict[str, Any], checker: dict[str, Any]) -> bool:
    """Whether two reports (``param_digest``/``param_sketch``) ran the same weights for a check."""
    if target.get("param_digest") and target.get("param_digest") == checker.get("param_digest"):
        return True
    return weights_distance(tuple(checker.get("param_sketch") or ()), tuple(target.get("param_sketch") or ())
                            ) <= SYNC_TOLERANCE


def checker_of(stage: int, replica: int, num_replicas: int) -> tuple[int, int]:
    return stage, (replica + 1) % num_replicas


def _seed(secret: int, stage: int, replica: int) -> int:
    h = hashlib.sha256(f"{secret}:{stage}:{replica}".encode()).digest()
    return int.from_bytes(h[:7], "big")


def checks_clause(*, num_replicas: int, prob: float, error_feedback: bool = False) -> tuple[bool, str]:
    """(whether the job's results are spot-checked, the words the ``planned`` event adds)."""
    if prob <= 0:
        return False, "spot checks off (--verify-prob 0)"
    if num_replicas < 2:
        return False, ("spot checks off: one replica per stage, so no node holds a stage to recompute it "
                       "(--replicas 2 or more checks results)")
    return True, (f"spot checks on (each micro-batch with probability {prob:g}, by a replica of its stage"
                  + ("; gradients sent with error feedback, ef=1, are not checked)" if error_feedback else ")"))


def _on_probation(target: dict[str, Any], probation: dict[str, int] | None) -> dict[str, Any]:
    until = (probation or {}).get(target["node_id"], 0)
    return {"probation_prob": PROBATION_PROB, "probation_until": until} if until > 0 else {}


def verify_plans(assignments: list[dict[str, Any]], *, prob: float, secret: int | None = None,
                 probation: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One ``verify`` dict per assignment (same order). No checks without replicas or with prob 0.
    ``probation``: node id -> step; a node accused once (a dispute) has its micro-batches of the
    steps before it checked with probability at least :data:`PROBATION_PROB`, so the second
    opinion comes within a few steps (told to its witnesses and checker, never to itself)."""
    if not assignments:
        return []
    R = assignments[0]["num_replicas"]
    if R < 2 or prob <= 0:
        return [{} for _ in assignments]
    secret = secrets.randbits(62) if secret is None else secret
    at = {(a["stage"], a["replica"]): a for a in assignments}
    out = []
    for a in assignments:
        s, r = a["stage"], pipeline_of(a)
        witness = []
        for ts in (s - 1, s + 1):
            if (ts, r) in at:
                chk = at[checker_of(ts, r, R)]
                witness.append({"stage": ts, "replica": r, "seed": _seed(secret, ts, r), "checker_id": chk["node_id"],
                                "checker_address": chk["address"], **_on_probation(at[(ts, r)], probation)})
        if is_helper(a):  # a helper witnesses for its pipeline's neighbours like their own worker; checks nobody
            out.append({"prob": prob, "witness": witness})
            continue
        target_r = (r - 1) % R
        target = at[(s, target_r)]
        # the neighbours of the target's stage in its pipeline, their helpers included
        witness_ids = [x["node_id"] for x in assignments if x["stage"] in (s - 1, s + 1) and pipeline_of(x) == target_r]
        check = {"stage": s, "replica": target_r, "node_id": target["node_id"], "seed": _seed(secret, s, target_r),
                 **_on_probation(target, probation),
                 "witness_ids": witness_ids}
        out.append({"prob": prob, "witness": witness, "check": check})
    return out


# A blame is judged this many peer timeouts after it was made. The blamed node may itself be
# waiting on someone else: a neighbour (up to one peer timeout before it blames it) after a
# gradient-averaging round with a silent replica (up to half another: node/training/worker.py). Its own blame must have had time to arrive, or an honest node held up behind a
# staller is judged a staller too (seen in the stall test on a loaded 2-core machine: the honest
# stage-0 replica averaging with the staller was blamed by its stage 1 and quarantined with it).
JUDGE_AFTER_PEER_TIMEOUTS = 3
MAX_KEPT_STEPS = 256  # per job: digests, losses and waiting checks of older steps are forgotten


# Steps around a worker's latest report whose commitments are kept (coordinator/jobs/binding.py):
# a check is reported with its step, and a witness's report of that step comes within a step or two
DIGESTS_KEPT_STEPS = 8


@dataclass(slots=True)
class _JobState:
    losses: dict[tuple[int, int, int, int], list[float]] = field(default_factory=dict)  # (attempt, s, r, step)
    weights: dict[tuple[int, int, int, int], dict] = field(default_factory=dict)  # digest+sketch by (attempt, s, r, step)
    # its commitments, {(micro-batch, what): digest}, by (attempt, s, r, step) (coordinator/jobs/binding.py)
    digests: dict[tuple[int, int, int, int], dict] = field(default_factory=dict)
    waiting: dict[tuple[int, int, int, int], list[dict]] = field(default_factory=dict)  # target key -> checks
    last_progress_s: dict[str, float] = field(default_factory=dict)  # node id -> time of its last report
    watched_since_s: float | None = None  # first report or blame seen (this coordinator process's memory)
    blames: dict[tuple[str, str], float] = field(default_factory=dict)  # (accuser, blamed) -> time
    blamed_at: dict[str, float] = field(default_factory=dict)  # accuser -> time of its last blame (kept when judged)
    blame_attempt: int = 0  # the attempt the blames belong to
    apart: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (attempt, stage) -> (who, since step)
    notices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # checks_void events not yet taken
    accusations: Accusations = field(default_factory=Accusations)  # mismatches reported, and their disputes
    noticed: set[tuple[int, int]] = field(default_factory=set)  # (attempt, stage) with a checks_void event
    num_checks: int = 0
    num_mismatches: int = 0
    num_unverifiable: int = 0  # checks between different (or missing) weights: not weighed
    num_weighed: int = 0
    num_contested: int = 0  # weighed checks with a witness copy the target disowns (binding.contested)
    num_bound: int = 0  # weighed checks whose every copy is what the target committed to (binding.bound)


class Judge:
    """In-memory, thread-safe; forgets a job with :meth:`forget`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobState] = {}

    def _job(self, job_id: str) -> _JobState:
        return self._jobs.setdefault(job_id, _JobState())

    def stats(self, job_id: str) -> dict[str, int]:
        """Checks reported, mismatches weighed, checks not weighed (different weights)."""
        with self._lock:
            st = self._jobs.get(job_id) or _JobState()
            return {"checks": st.num_checks, "mismatches": st.num_mismatches, "unverifiable": st.num_unverifiable,
                    "weighed": st.num_weighed, "bound": st.num_bound,
                    "contested": st.num_contested}

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def progress(self, job_id: str, node_id: str, now_s: float) -> None:
        with self._lock:
            st = self._job(job_id)
            st.last_progress_s[node_id] = now_s
            st.watched_since_s = now_s if st.watched_since_s is None else st.watched_since_s

    def report(self, job_id: str, attempt: int, a: dict[str, Any], assignments: list[dict[str, Any]],
               r: dict[str, Any], micro_batches: int = 4096) -> list[Verdict]:
        """Weigh one running progress report of assignment ``a``; returns verdicts (guilty nodes).
        ``micro_batches``: per step and pipeline (commitments of others are dropped)."""
        at = {(x["stage"], x["replica"]): x for x in assignments}
        R = a["num_replicas"]
        out: list[Verdict] = []
        with self._lock:
            st = self._job(job_id)
            own = (attempt, a["stage"], a["replica"], r["step"])
            # kept even when empty: a replica that sends no sketch in a checked job is then apart
            # from the others (_watch_sync), and checks of it are void, not left waiting
            st.weights[own] = {"param_digest": r.get("param_digest") or "",
                               "param_sketch": tuple(r.get("param_sketch") or ())}
            if r.get("micro_batch_losses"):
                st.losses[own] = list(r["micro_batch_losses"])
            # what it says it computed on and sent, kept for the steps around this one only: checks
            # and the witnesses' reports of a step come within a step or two of it
            st.digests[own] = {k: d for k, d in (r.get("digests") or {}).items() if k[0] < micro_batches}
            for k in [k for k in st.digests if k[:3] == own[:3] and abs(k[3] - own[3]) > DIGESTS_KEPT_STEPS]:
                del st.digests[k]
            out += self._watch_sync(job_id, st, attempt, a["stage"], r["step"], at)
            touched = {own}
            for c in r.get("checks", []):
                # only the designated checker of a target may report on it, and only on this step
                if (c["stage"], c["replica"]) not in at or checker_of(c["stage"], c["replica"], R) != (
                        a["stage"], a["replica"]) or c["step"] != r["step"]:
                    log.warning("ignoring a spot check from a node that is not the target's checker job=%s", job_id)
                    continue
                st.num_checks += 1
                # the worker that ran the micro-batch: the pipeline's own, or its helper (helpers.py)
                holder = holder_of(assignments, c["stage"], c["replica"], c["micro_batch"]) or at[(c["stage"],
                                                                                                   c["replica"])]
                target_key = (attempt, c["stage"], holder["replica"], c["step"])
                st.waiting.setdefault(target_key, []).append({
                    **c, "by": a["node_id"], "pos": share_position(holder, c["micro_batch"]), "checker": {
                    "param_digest": r.get("param_digest") or "", "param_sketch": tuple(r.get("param_sketch") or ())}})
                touched.add(target_key)
            # this report may be a witness's whose commitments a contested check waits for
            touched |= {k for k in st.waiting if k[0] == attempt and k[3] == r["step"]}
            for key in sorted(touched):
                out += self._settle(job_id, st, key, at, assignments)
            self._prune(st, r["step"])
        return out

    def _settle(self, job_id: str, st: _JobState, key: tuple[int, int, int, int],
                at: dict[tuple[int, int], dict[str, Any]], assignments: list[dict[str, Any]]) -> list[Verdict]:
        """Weigh the checks of target ``key`` once its weights are known (else they keep waiting;
        a mismatch whose copies the target disowns also waits for its witness's commitments)."""
        if key not in st.weights or key not in st.waiting:
            return []
        target_weights = st.weights[key]
        target = at[(key[1], key[2])]
        out: list[Verdict] = []
        keep = []
        for c in st.waiting.pop(key):
            if not same_weights(target_weights, c["checker"]):
                st.num_unverifiable += 1  # not the same weights: the comparison proves nothing
                log.info("spot check not weighed: checker and target ran different weights job=%s stage=%d "
                         "replica=%d step=%d distance=%.3g", job_id, key[1], key[2], key[3],
                         weights_distance(c["checker"]["param_sketch"], target_weights["param_sketch"]))
                continue
            reason = self._mismatch(job_id, st, key, target, c)
            accused = None
            if reason:
                accused = binding.weigh(c.get("copies") or {}, c["micro_batch"], checker=c["by"],
                                        target_id=target["node_id"], target=st.digests.get(key),
                                        witness=lambda side: self._witness(st, key, c, side, at, assignments),
                                        what_checked=c["what"])
                if accused == binding.WAIT:
                    keep.append(c)
                    continue
            st.num_weighed += 1
            if binding.contested(c.get("copies") or {}, c["micro_batch"], st.digests.get(key)):
                st.num_contested += 1  # a witness copy that is not what the target says it ran
            elif binding.bound(c.get("copies") or {}, c["micro_batch"], st.digests.get(key)):
                st.num_bound += 1
            if reason if c["what"] == "loss" else not c["match"]:
                st.num_mismatches += 1
            if not reason:
                continue
            if accused is None:  # the copies are the target's own: its result was wrong
                out += st.accusations.accuse(job_id, c["by"], target["node_id"], key[0], c["step"], reason)
            elif isinstance(accused, binding.Contest):
                log.warning("spot check contested job=%s step=%d: %s", job_id, c["step"], accused.reason)
                out += st.accusations.accuse(job_id, accused.accuser, accused.accused, key[0], c["step"],
                                             f"{accused.reason} ({reason})")
            else:
                st.num_unverifiable += 1  # a copy the target disowns, and nobody to weigh it against
        if keep:
            st.waiting[key] = keep
        return out

    @staticmethod
    def _mismatch(job_id: str, st: _JobState, key: tuple[int, int, int, int], target: dict[str, Any],
                  c: dict[str, Any]) -> str:
        """The accusation's words when check ``c`` (same weights) found the target wrong, else ""."""
        if c["what"] == "loss":
            losses = st.losses.get(key)
            pos = c.get("pos", c["micro_batch"])  # its place among the micro-batches the holder ran
            if losses is None or not 0 <= pos < len(losses) or abs(losses[pos] - c["value"]) <= LOSS_TOLERANCE:
                return ""
            return (f"spot check: reported loss {losses[pos]:.4f} of step {c['step']} micro-batch {c['micro_batch']} "
                    f"(stage {target['stage']}, replica {target['replica']}), recomputed {c['value']:.4f}")
        if c["match"]:
            return ""
        if not c["repeated_match"]:
            log.warning("spot check mismatch not confirmed by the checker's second recomputation "
                        "job=%s target=%s step=%d", job_id, target["node_id"][:12],
                        c["step"])
            return ""
        return (f"spot check: its {c['what']} of step {c['step']} micro-batch {c['micro_batch']} "
                f"(stage {c['stage']}, replica {c['replica']}) differs from the recomputation by "
                f"{c['error']:.3g} (tolerance {c['tolerance']:.3g}) with the same weights")

    @staticmethod
    def _witness(st: _JobState, key: tuple[int, int, int, int], c: dict[str, Any], side: int,
                 at: dict[tuple[int, int], dict[str, Any]], assignments: list[dict[str, Any]]):
        """(node id, commitments or None when not reported yet) of the worker at stage
        ``key[1] + side`` that exchanged check ``c``'s micro-batch with the target; None: none."""
        stage = key[1] + side
        holder = holder_of(assignments, stage, c["replica"], c["micro_batch"]) or at.get((stage, c["replica"]))
        if holder is None:
            return None
        return holder["node_id"], st.digests.get((key[0], stage, holder["replica"], key[3]))

    def take_notices(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        """``checks_void`` events to record (message, fields), each returned once."""
        with self._lock:
            st = self._jobs.get(job_id)
            if st is None:
                return []
            notices, st.notices = st.notices, []
            return notices

    def _watch_sync(self, job_id: str, st: _JobState, attempt: int, stage: int, step: int,
                    at: dict[tuple[int, int], dict[str, Any]]) -> list[Verdict]:
        """Once every replica of ``stage`` (its helpers included: coordinator/jobs/helpers.py)
        reported its sketch for ``step``: who stands apart (module doc), and a verdict or a notice
        when it has for :data:`APART_STEPS` steps."""
        reps = sorted(r for (s, r) in at if s == stage)  # replica indices of the stage's workers
        R = len(reps)
        if R < 2:
            return []
        reports = [st.weights.get((attempt, stage, r, step)) for r in reps]
        if any(w is None for w in reports):  # not every replica has reported the step yet
            return []
        if not any(w["param_sketch"] for w in reports) or any(w["param_digest"] and not w["param_sketch"]
                                                              for w in reports):
            return []  # no sketches at all (an unchecked job), or an older node's digest: nothing to compare
        # a replica that sent no sketch while the others did is infinitely far from them
        sketches = [w["param_sketch"] for w in reports]
        far = [[weights_distance(sketches[i], sketches[j]) > SYNC_TOLERANCE for j in range(R)] for i in range(R)]
        who: int | None = None
        if R == 2:
            who = -1 if far[0][1] or far[1][0] else None  # apart, nobody to name
        else:
            alone = [i for i in range(R) if all(far[i][j] for j in range(R) if j != i)]
            if len(alone) == 1 and not any(far[i][j] for i in range(R) for j in range(R)
                                           if i != j and alone[0] not in (i, j)):
                who = alone[0]
        key = (attempt, stage)
        current = st.apart.get(key)
        if who is None:
            st.apart.pop(key, None)
            return []
        if current is None or current[0] != who:
            st.apart[key] = (who, step)
            return []
        since = current[1]
        if step - since < APART_STEPS:
            return []
        del st.apart[key]  # judged once; a streak that goes on starts over
        syncs = (step - since) // RESYNC_EVERY_STEPS
        if who >= 0:
            return [Verdict(at[(stage, reps[who])]["node_id"], (
                f"its weights (the parameter sketches it reported) stood apart from all {R - 1} other replicas' "
                f"of stage {stage}, which agreed, from step {since} to {step} ({syncs} parameter re-syncs): it "
                f"misreports them, which voids every check of it, or it does not average with them"), since)]
        if key in st.noticed:  # one event per attempt and stage: the pair stays as it is until a re-plan
            return []
        st.noticed.add(key)
        nodes = [at[(stage, r)]["node_id"] for r in reps]
        log.warning("replicas of stage %d apart since step %d job=%s nodes=%s", stage, since, job_id, nodes)
        st.notices.append((
            f"the 2 replicas of stage {stage} reported different weights from step {since} to {step} "
            f"({syncs} parameter re-syncs): every check between them is void; one of them misreports its weights "
            f"or they cannot average, and with 2 replicas the coordinator cannot tell which (3 replicas can)",
            {"stage": stage, "since_step": since, "step": step, "nodes": nodes}))
        return []

    @staticmethod
    def _prune(st: _JobState, step: int) -> None:
        for d in (st.weights, st.losses, st.waiting):
            for k in [k for k in d if k[3] < step - MAX_KEPT_STEPS]:
                del d[k]

    def restore(self, job_id: str, accusations: list[Accusation]) -> None:
        """Accusations a previous coordinator process weighed (its ``disputed`` job events), so a
        restart neither forgets an accused node's first accusation nor a liar's; no dispute is
        opened for them again (their rollbacks happened)."""
        with self._lock:
            self._job(job_id).accusations.restore(accusations)

    def open_disputes(self, job_id: str) -> list[Accusation]:
        """Accusations of a node that no second checker decided yet (one accuser each)."""
        with self._lock:
            st = self._jobs.get(job_id)
            return st.accusations.open_disputes() if st is not None else []

    def take_disputes(self, job_id: str) -> list[Accusation]:
        """First accusations of a node that the caller has not seen yet, each returned once."""
        with self._lock:
            st = self._jobs.get(job_id)
            return st.accusations.take_disputes() if st is not None else []

    def blame(self, job_id: str, accuser: str, blamed: str, now_s: float, attempt: int = 0) -> None:
        with self._lock:
            st = self._job(job_id)
            st.watched_since_s = now_s if st.watched_since_s is None else st.watched_since_s
            if attempt > st.blame_attempt:  # a re-plan: the last attempt's blames are settled
                st.blames.clear()
                st.blamed_at.clear()
                st.blame_attempt = attempt
            elif attempt < st.blame_attempt:
                return
            st.blames.setdefault((accuser, blamed), now_s)
            st.blamed_at[accuser] = max(now_s, st.blamed_at.get(accuser, 0.0))

    def resolve_blames(self, job_id: str, now_s: float, grace_s: float, is_online=lambda node_id: True,
                       attempt: int = 0) -> tuple[list[Verdict], bool]:
        """(verdicts, dispute) for the blames of ``attempt`` older than ``JUDGE_AFTER_PEER_TIMEOUTS
        * grace_s`` (``grace_s``: the job's peer timeout; blames of earlier attempts are dropped):
        a blamed node that sent no progress for the job from before the blame until now, still
        online (``is_online``: heartbeating), that blamed nobody itself since it went silent, is
        guilty of stalling."""
        out, dispute = [], False
        with self._lock:
            st = self._jobs.get(job_id)
            if st is None:
                return [], False
            if attempt > st.blame_attempt:
                st.blames.clear()
                st.blamed_at.clear()
                st.blame_attempt = attempt
            for (accuser, blamed), at in list(st.blames.items()):
                if now_s - at < JUDGE_AFTER_PEER_TIMEOUTS * grace_s:
                    continue
                del st.blames[(accuser, blamed)]
                if st.blames.pop((blamed, accuser), None) is not None:
                    dispute = True
                    continue
                # never reported since this process watches the job (a restarted coordinator):
                # silent at least since it started watching, not since 1970
                silent_since = st.last_progress_s.get(blamed, st.watched_since_s or 0.0)
                if st.blamed_at.get(blamed, -1.0) >= silent_since or not is_online(blamed):
                    # it was waiting on someone else itself (a chain behind a lost node, a replica
                    # held up in averaging by a staller), or it is not heartbeating (lost, not
                    # stalling): nothing to hold against it
                    dispute = True
                    continue
                # silent from before the blame until now (>= grace_s after it). Not "silent for
                # grace_s before the blame": the accuser starts waiting as soon as it sent its
                # step, while the blamed node's report of its last step may land a moment later,
                # which made most stalls look like disputes (measured: 5 re-plans before a
                # stall-after-steps=5 node was quarantined)
                if silent_since <= at and now_s - silent_since >= grace_s:
                    out.append(Verdict(blamed, f"stalled: no progress for {now_s - silent_since:.0f} s while its "
                                               f"neighbour waited (still heartbeating)", None))
                else:
                    dispute = True
        return out, dispute

    def has_blames(self, job_id: str) -> bool:
        with self._lock:
            st = self._jobs.get(job_id)
            return bool(st and st.blames)
