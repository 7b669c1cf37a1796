"""Spot checks of training stages: witnesses and checkers (docs/security.md, "Verification").

Protocol (per checked stage T = (stage s, replica r); its checker C is the replica
(s, (r + 1) mod R) of the same stage, which holds the same weights at the same step):

- Which micro-batches are checked is decided by ``sampled(seed_T, step, micro_batch, prob)``;
  the coordinator gives ``seed_T`` to T's neighbours and to C, never to T itself, so T cannot
  tell which of its results will be recomputed.
- T's neighbours are its WITNESSES: for a sampled micro-batch, the previous stage sends C a copy
  of the activation it sent T (``witness_input``) and of the gradient T sent back
  (``witness_grad_in``); the next stage sends C the activation T sent it (``witness_output``)
  and the gradient it sent T (``witness_grad_out``). Copies are raw float32 on PushTensor.
- At the end of the step, before its optimizer step (its weights are still those of the step),
  C recomputes T's forward (from the witnessed input, or the tokens on stage 0) and, when T has
  a previous stage, the input gradient; the last stage's loss too. It compares with relative L2
  error (loss: absolute) against :data:`TOLERANCE`; on a mismatch it recomputes once more (the
  second opinion available with two replicas) and reports a :class:`SpotResult` with its
  ProgressReport. The coordinator judges and quarantines (coordinator/jobs/spotchecks.py).
- Every worker of a checked job reports a linear sketch of its stage's parameters
  (node/training/weight_sketch.py :func:`param_sketch`) for every step (the weights that step ran
  with). The coordinator weighs a check only when the checker and the checked node ran the same
  weights: sketches within ``SYNC_TOLERANCE`` (relative L2 distance of the weights,
  coordinator/jobs/spotchecks.py; exact copies are 0 apart).
  (:func:`param_digest`, exact bytes, was reported too: it cost a second pass over the weights every
  step, 3.3% of a checked step on the 2-core box, and decided nothing the sketch does not; a digest
  an older node still sends is honoured.) Replicas are never bit-identical after a successful hivemind
  round (each adds an fp16-compressed delta to its own copy: ~1e-4 apart), and a failed round
  leaves each with its own gradients (~1e-2 apart); the second case is void, counted as
  unverifiable. To bring drifted replicas back, jobs with replicas average their *parameters* with the
  replicas every ``RESYNC_EVERY_STEPS`` steps (swarm/pipeline/averaging.py, node/training/worker.py).
- What checking costs a step (bench/verification.py measures it): the recomputations, the
  sketch run while the step's gradient round is in flight (they only read the
  weights), and the parameter round runs in the background behind the next step's compute
  (swarm/pipeline/averaging.py); what is left on the step's path is the witness copies and the
  work the overlapped parts take from the CPU.

Compressed boundaries (``direct``, ``aqsgd``) are checked too (swarm/compression/replay.py): the
witnesses send what the checked stage's neighbours *computed on* (the decoded values: the
previous stage's reconstruction of what it sent, the next stage's decoded input, the decoded
gradients), and for an AQ-SGD output also the next stage's m(x) of the samples before the
message (``witness_output_ref``). The checker then replays an honest sender: it encodes its
recomputed output (against that m(x)) and gradient, and widens the tolerance by twice the
relative rounding error those honest messages show (0 for ``none``).
Gradients sent with error feedback (``ef=1``) are not checked: the residual added is the
sender's alone; their outputs and losses are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from node.training.commitments import StepCommitments, reference, tensor_digest
from swarm.compression import CodecSpec, replay
from swarm.errors import InvalidRequestError
from swarm.transport import tensors as wt

log = logging.getLogger(__name__)

# Relative L2 error an honest recomputation may show. A check counts only when the checker and
# the checked node reported the same parameter digest for the step (coordinator/jobs/spotchecks.py),
# so both ran the same weights on the same witnessed input: honest differences are then float
# noise of the kernels (CPU fp32: < 1e-5 measured, tests/unit/foundation/test_spotcheck_digest.py);
# a corrupted tensor (noise of its own scale) shows ~1-1.4. The margin leaves room for other
# kernels (another BLAS, another GPU) on the two ends; CUDA bf16 is still to be measured.
TOLERANCE = {"output": 0.1, "grad_in": 0.1}
LOSS_TOLERANCE = 0.1  # nats, absolute
# Replicas average their parameters every RESYNC_EVERY_STEPS steps (swarm/pipeline/averaging.py),
# so replicas that a failed gradient round set apart are within the coordinator's SYNC_TOLERANCE
# again: checks are void for at most that many steps (plus one) after a failed round.
WITNESS_WAIT_S = 10.0  # how long a checker waits for one witness copy (at most the job's peer timeout)
# An AQ-SGD output's m(x) reference follows its witness copy at once, from the same sender: one
# that has not come this long after the copy is not coming (a witness older than compressed checks)
REF_WAIT_S = 2.0
# References missing this many checked outputs in a row: the witness sends none (an older node),
# and the attempt's output checks of the stage are void from then on. Fewer: only those checks
# are void (a copy is best effort and may be dropped), so one honest drop voids one check, and a
# witness shielding its neighbour by withholding references must withhold them 3 times in a row.
REF_MISSES_BEFORE_VOID = 3
WITNESS_KINDS = ("witness_input", "witness_output", "witness_grad_out", "witness_grad_in", "witness_output_ref")
REFS_KEPT = 64  # m(x) references kept at least (2 steps' worth when more) not yet committed


def sampled(seed: int, step: int, micro_batch: int, prob: float) -> bool:
    """Whether micro-batch ``micro_batch`` of ``step`` of a stage with sampling ``seed`` is checked."""
    if prob <= 0:
        return False
    h = hashlib.sha256(f"{seed}:{step}:{micro_batch}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < prob


def _probation(raw: dict) -> dict:
    """A role's optional probation fields (absent from a coordinator older than disputes)."""
    prob, until = float(raw.get("probation_prob", 0.0)), int(raw.get("probation_until", 0))
    if not 0.0 <= prob <= 1.0 or until < 0:
        raise ValueError(f"probation {prob} until step {until} out of range")
    return {"probation_prob": prob, "probation_until": until}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().flatten(), want.detach().double().flatten()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sampling:
    """A target's sampling: on probation (a disputed check of it, coordinator/jobs/spotchecks.py)
    its micro-batches of steps before ``probation_until`` are checked with ``probation_prob``."""

    probation_prob: float = 0.0
    probation_until: int = 0

    def prob_at(self, step: int, prob: float) -> float:
        """The probability a micro-batch of ``step`` is checked (``prob``: the job's)."""
        return max(prob, self.probation_prob) if step < self.probation_until and prob > 0 else prob


@dataclass(frozen=True, slots=True, kw_only=True)
class WitnessRole(_Sampling):
    """This node witnesses target (stage, replica); copies go to its checker."""

    stage: int
    replica: int
    seed: int
    checker_id: str
    checker_address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckRole(_Sampling):
    """This node checks target (stage, replica), whose neighbours are ``witness_ids``."""

    stage: int
    replica: int
    node_id: str
    seed: int
    witness_ids: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyPlan:
    prob: float = 0.0
    witness: tuple[WitnessRole, ...] = ()
    check: CheckRole | None = None

    @classmethod
    def from_json(cls, text: str) -> VerifyPlan:
        """Parse the assignment's ``verify_json`` (coordinator/jobs/spotchecks.py). Raises InvalidRequestError."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            witness = tuple(WitnessRole(stage=int(w["stage"]), replica=int(w["replica"]), seed=int(w["seed"]),
                                        checker_id=str(w["checker_id"]), checker_address=str(w["checker_address"]),
                                        **_probation(w))
                            for w in raw.get("witness", []))
            c = raw.get("check")
            check = None if not c else CheckRole(stage=int(c["stage"]), replica=int(c["replica"]),
                                                 node_id=str(c["node_id"]), seed=int(c["seed"]),
                                                 witness_ids=frozenset(str(i) for i in c["witness_ids"]),
                                                 **_probation(c))
            prob = float(raw.get("prob", 0.0))
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise InvalidRequestError(f"malformed verify plan in the assignment: {exc}") from exc
        if not 0 <= prob <= 1:
            raise InvalidRequestError("verify prob must be in 0..1")
        return cls(prob=prob, witness=witness, check=check)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpotResult:
    stage: int
    replica: int
    step: int
    micro_batch: int
    what: str  # "output" | "grad_in" | "loss"
    match: bool
    error: float
    tolerance: float
    repeated_match: bool
    value: float = 0.0
    # (what, digest) of the witness copies the check computed on (node/training/commitments.py):
    # the coordinator weighs them against the checked node's own commitments
    copies: tuple[tuple[str, bytes], ...] = ()


def recompute(module, *, x: torch.Tensor, is_first: bool, is_last: bool, labels: torch.Tensor | None,
              grad_out: torch.Tensor | None, loss_scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(output or loss, input gradient) of ``module`` on ``x`` without touching its parameter
    gradients. ``x``: token ids (b, S) on the first stage, hidden states (b, S, H) otherwise."""
    with torch.enable_grad():
        xin = x if is_first else x.detach().clone().requires_grad_(True)
        out = module(xin)
        if is_last:
            logits = out.float()  # (b, S, V)
            out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            seed_grad = None
            target = out * loss_scale
        else:
            seed_grad, target = grad_out, out
        gin = None
        if not is_first and (is_last or grad_out is not None):
            (gin,) = torch.autograd.grad(target, [xin], grad_outputs=seed_grad)
    return out.detach(), None if gin is None else gin.detach()


def _falsified(r: SpotResult) -> SpotResult:
    """SWARM_FAULT ``false-checks`` (tests only): ``r`` turned into a confirmed mismatch (a loss one
    ``LOSS_TOLERANCE`` off), as a checker framing its target would report it."""
    log.warning("SWARM_FAULT: reporting a false mismatch of stage %d replica %d step %d", r.stage, r.replica, r.step)
    if r.what == "loss":
        return dataclasses.replace(r, value=r.value + 2 * LOSS_TOLERANCE)
    return dataclasses.replace(r, match=False, error=10 * r.tolerance, repeated_match=True)


def witness_header(*, job_id: str, kind: str, role: WitnessRole, step: int, micro_batch: int, ids, payload: bytes,
                   shape, sender_id: str, attempt: int) -> wt.TensorHeader:
    return wt.make_header(payload, job_id=job_id, step=step, micro_batch=micro_batch,
                          sample_ids=tuple(int(i) for i in ids), shape=tuple(shape), dtype="float32", codec="none",
                          kind=kind, boundary=role.stage, sender_id=sender_id, replica=role.replica, attempt=attempt)


class StageVerifier:
    """A stage worker's side of spot checks: sends witness copies and runs its checks.

    ``worker`` is the :class:`~node.training.worker.StageWorker` (its assignment, module,
    dataset, batch order, endpoint and stop event are used; nothing else)."""

    def __init__(self, worker, plan: VerifyPlan) -> None:
        from node.training.sender import PeerSender

        self.w = worker
        self.plan = plan
        a = worker.a
        self._senders: dict[str, PeerSender] = {}
        self._roles: dict[tuple[int, int], WitnessRole] = {(r.stage, r.replica): r for r in plan.witness}
        for r in plan.witness:
            if r.checker_address not in self._senders:
                self._senders[r.checker_address] = PeerSender(
                    r.checker_address, security=worker.security, node_id=r.checker_id,
                    what=f"checker {r.checker_id[:12]}", timeout_s=worker.timeout_s)
        # this stage's neighbours in its replica: the targets it may witness
        self._prev_target = self._roles.get((a.stage - 1, a.pipeline))
        self._next_target = self._roles.get((a.stage + 1, a.pipeline))
        # compressed boundaries are replayed (swarm/compression/replay.py)
        self.spec = a.spec.codec if isinstance(a.spec.codec, CodecSpec) else CodecSpec.parse(str(a.spec.codec))
        self.aqsgd = self.spec.kind == "aqsgd"
        self.grads_checkable = replay.gradient_checkable(self.spec)
        for up in getattr(worker, "ups", ()):  # AQ-SGD: each encode keeps what this stage commits to
            up.keep_sent = self.active and self.aqsgd
        # (step, micro-batch) -> the m(x) rows (and seen flags) of each output of the previous
        # stage, kept by a gRPC thread as it decodes it (received_ref): committed to, and sent with a copy
        self._refs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._refs_lock = threading.Lock()
        self._no_refs = False  # the output witness sends no m(x) references: AQ-SGD output checks are void
        self._ref_misses = 0  # checked outputs in a row whose reference did not come
        self._commits = StepCommitments()  # this step's (micro-batch, what, digest)
        self.num_checks = self.num_mismatches = self.num_witness_dropped = 0
        # seconds spent on checking in this job's steps (node/training/worker.py logs them at the end)
        self.cost = dict.fromkeys(("steps", "step_s", "recompute_s", "weights_s", "resync_s", "witness_s", "round_s"), 0.0)

    @property
    def active(self) -> bool:
        return self.plan.prob > 0

    # -- witnessing and committing ---------------------------------------------------------------
    def _view(self, what: str, role: WitnessRole | None, kind: str, step: int, m: int, ids, t) -> None:
        """This stage's side of tensor ``t`` (or a function making it) of micro-batch ``m``: its
        commitment (node/training/commitments.py) and, for a sampled micro-batch of a stage it
        witnesses, the copy for that stage's checker."""
        if not self.active:
            return
        t0 = time.monotonic()
        copy = role is not None and sampled(role.seed, step, m, role.prob_at(step, self.plan.prob))
        t = t() if callable(t) else t
        if copy and self.w.faults.lies_as_witness():  # SWARM_FAULT false-witness (tests only)
            t = self.w.faults.false_copy(t)  # and commits to it too, as a witness covering its lie would
        self._commits.add(m, what, t)
        if copy:
            self._send_copy(role, kind, step, m, ids, t)
        self.cost["witness_s"] += time.monotonic() - t0

    def _send_copy(self, role: WitnessRole, kind: str, step: int, m: int, ids, t: torch.Tensor) -> None:
        w = self.w
        payload = wt.raw_encode(t.detach().to("cpu", torch.float32).contiguous())
        h = witness_header(job_id=w.a.job_id, kind=kind, role=role, step=step, micro_batch=m, ids=ids,
                           payload=payload, shape=t.shape, sender_id=w.node_id, attempt=w.a.attempt)
        # best effort: a checker that stalls or died voids its checks, it never holds up or fails
        # this stage (a stage whose witness copy a stalled checker refused used to fail, silent,
        # and was then quarantined as the staller by its own neighbour's blame)
        if not self._senders[role.checker_address].try_send(wt.WireTensor(header=h, payload=payload)):
            self.num_witness_dropped += 1
            if self.num_witness_dropped == 1:
                log.warning("witness copies to %s are not going through (checker stalled or gone): its checks "
                            "of this stage are void", role.checker_id[:12])

    def take_commitments(self) -> list[tuple[int, str, bytes]]:
        """(micro-batch, what, digest) of the step's tensors so far, each returned once."""
        return self._commits.take()

    # What the checked stage computed on or sent, as its neighbour holds it: with a lossy codec the
    # decoded values, not this stage's own (``sent``: a function giving them after the encode).
    def sent_activation(self, step: int, m: int, ids, sent, codec=None) -> None:
        self._view("output", self._next_target, "witness_input", step, m, ids, sent)
        # with AQ-SGD, also the m(x) rows the next stage decodes it against (its witness_output_ref
        # copy), as the encode kept them (BoundaryCodec.keep_sent)
        last = getattr(codec, "last_sent", None)
        if self.active and self.aqsgd and last is not None:
            self._commits.add_reference(m, last[2], last[3])

    @property
    def keeps_refs(self) -> bool:
        """Whether received AQ-SGD outputs hand their m(x) before decoding to :meth:`received_ref`."""
        return self.aqsgd and self.active

    def received_ref(self, step: int, m: int, rows: torch.Tensor, seen: torch.Tensor) -> None:
        """A gRPC thread decoded the previous stage's output (step, m): m(x) ``rows`` (where the
        codec keeps them) and ``seen`` flags as they were before it, for this stage's
        ``input_ref`` commitment and, when that output is checked, the copy its checker replays
        the message against (both in :meth:`received_activation`)."""
        with self._refs_lock:
            self._refs[(step, m)] = (rows, seen)
            # a received tensor is consumed within its step or the next: older ones were left by a fence
            for key in [k for k in self._refs if k[0] < step - 1] + sorted(self._refs)[:-max(REFS_KEPT, 2 * self.w.M)]:
                self._refs.pop(key, None)

    def received_activation(self, step: int, m: int, ids, t: torch.Tensor) -> None:
        self._view("input", self._prev_target, "witness_output", step, m, ids, t)
        if self.aqsgd and self.active:
            with self._refs_lock:
                ref = self._refs.pop((step, m), None)
            if ref is None:
                return
            self._commits.add_reference(m, *ref, what="input_ref")
            role = self._prev_target
            if role is not None and sampled(role.seed, step, m, role.prob_at(step, self.plan.prob)):
                self._send_copy(role, "witness_output_ref", step, m, ids, reference(*ref))

    def received_gradient(self, step: int, m: int, ids, t: torch.Tensor) -> None:
        if self.grads_checkable:
            self._view("grad_out", self._next_target, "witness_grad_in", step, m, ids, t)

    def sent_gradient(self, step: int, m: int, ids, sent) -> None:
        if self.grads_checkable:
            self._view("grad_in", self._prev_target, "witness_grad_out", step, m, ids, sent)

    # -- receiving witness copies (the checker) -------------------------------------------------
    def check_header(self, h: wt.TensorHeader):
        """Validate a witness copy's header (runs in gRPC threads); returns (None, ids, shape)."""
        c, w = self.plan.check, self.w
        if c is None or not self.active:
            raise InvalidRequestError("this stage checks no other stage")
        shape = (w.b, w.S * w.H + 1) if h.kind == "witness_output_ref" else (w.b, w.S, w.H)
        wt.validate_header(h, wt.TensorExpectation(
            job_id=w.a.job_id, kind=h.kind, shape=shape, dtype="float32", codec="none", boundary=c.stage,
            replica=c.replica, attempt=w.a.attempt, sender_ids=c.witness_ids, num_sample_ids=w.b))
        cur = w._cur_step
        if not (cur - 1 <= h.step <= cur + 1) or not 0 <= h.micro_batch < w.M:
            raise InvalidRequestError(f"witness copy rejected: step {h.step} micro-batch {h.micro_batch}")
        ids = w.order.micro_batches(h.step, c.replica)[h.micro_batch]
        if tuple(h.sample_ids) != tuple(int(i) for i in ids):
            raise InvalidRequestError("witness copy rejected: sample ids differ from the micro-batch's samples")
        return None, ids, shape

    def decode(self, h: wt.TensorHeader, payload: bytes) -> torch.Tensor:
        self.check_header(h)
        t = wt.raw_decode(payload, shape=h.shape, dtype="float32")
        # (a non-finite copy, which would make any recomputation "differ", is refused by the
        # endpoint's finite check of every tensor it accepts: node/training/exchange.py)
        if h.kind == "witness_output_ref" and not bool(((t[:, -1] == 0) | (t[:, -1] == 1)).all()):
            raise InvalidRequestError("witness copy rejected: its seen flags must be 0 or 1")
        return t.to(self.w.device)

    # -- checking ----------------------------------------------------------------------------------
    def _get(self, kind: str, step: int, m: int, wait_s: float = WITNESS_WAIT_S) -> torch.Tensor | None:
        """A witness copy, or None (logged) when it does not come within WITNESS_WAIT_S or the
        attempt is being fenced: the checked replica may be the one lost, and a checker waiting
        for its witnesses would hold up the fence (a stage-0 loss cost 40 s: 10 s per copy)."""
        from swarm.errors import PeerError

        w = self.w
        fencing = w.membership.fence_pending

        def fenced() -> None:
            if fencing.is_set():
                raise PeerError("the attempt is being fenced (a replica changed); the check is void")
        try:
            return w.endpoint.get(kind, step, m, timeout_s=min(w.timeout_s, wait_s), stop=w.stop_event,
                                  what=f"a witness of stage {self.plan.check.stage}", check=fenced)
        except PeerError as exc:
            log.warning("spot check skipped job=%s step=%d micro_batch=%d: %s", w.a.job_id, step, m, exc)
            return None

    def check_step(self, step: int) -> list[SpotResult]:
        """Run this step's checks of the target (before the optimizer step); returns the results."""
        c, w = self.plan.check, self.w
        if c is None or not self.active:
            return []
        a = w.a
        out: list[SpotResult] = []
        is_first, is_last = a.is_first, a.is_last
        for m in range(w.M):
            if not sampled(c.seed, step, m, c.prob_at(step, self.plan.prob)):
                continue
            ids = w.order.micro_batches(step, c.replica)[m]
            x = torch.from_numpy(w.dataset.inputs(ids)).to(w.device) if is_first else self._get("witness_input", step, m)
            y = None if (is_last or x is None) else self._get("witness_output", step, m)
            if x is None or (not is_last and y is None):
                break  # a witness is missing: so will the step's others be (its sender died, or a fence)
            ref = None
            if self.aqsgd and y is not None and not self._no_refs:
                ref = self._get("witness_output_ref", step, m, wait_s=REF_WAIT_S)
                self._ref_misses = 0 if ref is not None else self._ref_misses + 1
                if self._ref_misses >= REF_MISSES_BEFORE_VOID:
                    self._no_refs = True
                    log.warning("the output witness of stage %d sent no AQ-SGD m(x) reference %d times in a row (a "
                                "node older than compressed checks?): this attempt's output checks of it are void",
                                c.stage, self._ref_misses)
            if self.aqsgd and ref is None:
                y = None  # an output check without the reference cannot tell rounding from corruption
            grads = self.grads_checkable and not is_first
            g_out = None if (is_last or not grads) else self._get("witness_grad_out", step, m)
            g_in = self._get("witness_grad_in", step, m) if grads else None
            labels = torch.from_numpy(w.dataset.labels(ids)).to(w.device) if is_last else None
            run = lambda: recompute(w.module, x=x, is_first=is_first, is_last=is_last, labels=labels,  # noqa: E731
                                    grad_out=g_out, loss_scale=w.runner.loss_scale)
            first = run()
            seen = {"input": None if is_first else x, "output": y, "output_ref": ref, "grad_out": g_out, "grad_in": g_in}
            copies = lambda *whats: tuple((k, tensor_digest(seen[k])) for k in whats if seen[k] is not None)  # noqa: E731
            base = dict(stage=c.stage, replica=c.replica, step=step, micro_batch=m)
            if is_last:
                out.append(SpotResult(**base, what="loss", match=True, error=0.0, tolerance=LOSS_TOLERANCE,
                                      repeated_match=True, value=float(first[0]), copies=copies("input")))
            elif y is not None:
                # a lossy boundary: allow twice the rounding error an honest message of this sample shows
                tol = TOLERANCE["output"] + 2 * rel_error(self._honest_output(first[0], ref), first[0])
                out.append(self._compare(base, "output", first[0], y, lambda: run()[0], tol,
                                         copies("input", "output", "output_ref")))
            if g_in is not None and first[1] is not None:
                tol = TOLERANCE["grad_in"] + 2 * rel_error(replay.honest_backward(self.spec, first[1]), first[1])
                out.append(self._compare(base, "grad_in", first[1], g_in, lambda: run()[1], tol,
                                         copies("input", "grad_out", "grad_in")))
        w.endpoint.discard(lambda key: key[0] in WITNESS_KINDS and key[1] <= step)
        return [_falsified(r) if w.faults.lies_in_check() else r for r in out]

    def _honest_output(self, out: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """What the next stage decodes when an honest checked stage sends ``out`` (its message
        replayed; with AQ-SGD against the next stage's m(x) before it, ``ref``)."""
        if ref is None:
            return replay.honest_forward(self.spec, out)
        return replay.honest_forward(self.spec, out, reference=ref[:, :-1].reshape(out.shape), seen=ref[:, -1] > 0.5)

    def _compare(self, base: dict, what: str, mine: torch.Tensor, theirs: torch.Tensor, again, tol: float,
                 copies: tuple[tuple[str, bytes], ...]) -> SpotResult:
        self.num_checks += 1
        err = rel_error(theirs, mine)
        match = err <= tol
        log.info("spot check job=%s stage=%d replica=%d step=%d micro_batch=%d %s error=%.3g tol=%.3g", self.w.a.job_id,
                 base["stage"], base["replica"], base["step"], base["micro_batch"], what, err, tol)
        repeated = True
        if not match:  # second opinion: recompute; a checker that disagrees with itself proves nothing
            repeated = rel_error(again(), mine) <= tol
            self.num_mismatches += 1
            log.warning("spot check MISMATCH job=%s stage=%d replica=%d step=%d micro_batch=%d %s error=%.3g tol=%.3g",
                        self.w.a.job_id, base["stage"], base["replica"], base["step"], base["micro_batch"], what,
                        err, tol)
        return SpotResult(**base, what=what, match=match, error=err if err == err and err != float("inf") else 1e30,
                          tolerance=tol, repeated_match=repeated, copies=copies)

    def close(self) -> None:
        for s in self._senders.values():
            s.close()
