"""A stage worker: trains one stage of one job on this node, talking to its neighbours directly.

Protocol it follows (see also protos/swarm/proto/v1/training.proto):

1. fetch its stage's weights (and, on the first/last stage, the tokenised data) from the
   coordinator; build the stage; open its boundary codecs and its endpoint for incoming tensors;
2. with replicas, meet them through the coordinator's rendezvous and start a hivemind averager;
   then report ``ready`` and wait for ``start`` (the start fence, node/training/membership.py);
   steps 1 and 2 are node/training/worker_setup.py;
3. each step (during a replica-loss fence: stop at the switch step, see coordinator/jobs/churn.py), run the schedule (1F1B or GPipe): forward micro-batches (stage 0 reads tokens,
   others wait for the previous stage's activations), send outputs to the next stage; backward
   (the last stage starts from the loss, others wait for the next stage's gradients), send input
   gradients to the previous stage; average gradients with the replicas; clip; AdamW step;
4. report progress every step (the reply may say stop), checkpoint every K steps (snapshot to
   CPU, then written and uploaded in the background: node/training/checkpoints.py), and a final
   checkpoint when done; a coordinator outage shorter than ``outage_s`` only delays reports and
   uploads (they are re-sent);
5. any failure (peer timeout, rejected tensor, bad data) is reported as ``failed`` with the
   reason; a stop from the coordinator ends the worker quietly.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from swarm.compression import replay
from swarm.errors import PeerError
from swarm.faults import NO_FAULTS, FaultConfig, FaultInjector
from swarm.pipeline import schedule
from swarm.pipeline.averaging import RESYNC_EVERY_STEPS
from swarm.pipeline.optim import clip_and_step
from swarm.pipeline.optim_state import stage_optimizer_state
from swarm.proto.v1 import training_pb2 as pb

from node.training.assignment import Assignment
from node.training.checkpoints import CheckpointWriter, Snapshot, snapshot_tensors
from node.training.kept import CheckpointKeeper
from node.training.client import TrainingClient
from node.training.exchange import Endpoint, Endpoints
from node.training.membership import DEFAULT_OUTAGE_S, FenceReached, Membership, through_outage
from node.training.reporter import Reporter
from node.training.sender import PeerSender
from node.training.tensor_io import MicroBatchDropped, TensorIO
from node.training.spotcheck import StageVerifier
from node.training.weight_sketch import param_sketch
from node.training.worker_setup import WorkerSetup

MERGE_TIMEOUT_S = 10.0  # at a fence's switch step, how long the live replicas may take to merge (_merge_survivors)

log = logging.getLogger(__name__)


def vars_of(obj) -> dict:
    return {k: getattr(obj, k) for k in obj.__slots__}


def spot_check_pb(c) -> pb.SpotCheck:
    """A :class:`~node.training.spotcheck.SpotResult` as it goes in a ProgressReport."""
    fields = vars_of(c)
    copies = [pb.TensorDigest(micro_batch=c.micro_batch, what=w, digest=d) for w, d in fields.pop("copies")]
    return pb.SpotCheck(**fields, copies=copies)


class StopRequested(Exception):
    """The coordinator ended the job (or the node is stopping)."""


class StageWorker(WorkerSetup, TensorIO):
    def __init__(self, a: Assignment, *, client: TrainingClient, endpoints: Endpoints, node_id: str,
                 device: str, state_dir: Path, on_metrics=None, emulate_link_bps: float = 0.0,
                 traffic=None, security=None, outage_s: float = DEFAULT_OUTAGE_S,
                 faults: FaultConfig = NO_FAULTS) -> None:
        self.a = a
        self.security = security  # swarm.transport.tls: channels to the neighbours
        self.outage_s = outage_s  # how long training goes on without reaching the coordinator
        self.faults = FaultInjector(faults)  # SWARM_FAULT, tests only (swarm/faults.py)
        self.verifier: StageVerifier | None = None
        self.blame = ""  # the neighbour that stopped answering, when that is why this worker failed
        self.traffic = traffic  # node.traffic.Traffic or None
        self.client = client
        self.endpoints = endpoints
        self.node_id = node_id
        self.device = torch.device(device)
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "training" / a.job_id / f"stage-{a.stage}-r{a.replica}"
        self.on_metrics = on_metrics or (lambda **kw: None)
        self.emulate_link_bps = emulate_link_bps
        self.stop_event = threading.Event()
        self.done = threading.Event()
        self.error: str = ""
        self._cur_step = 0
        self._thread = threading.Thread(target=self._run, name=f"stage-{a.job_id[:6]}-{a.stage}", daemon=True)
        self.senders: list[PeerSender] = []
        self._sender_failed_at: dict[str, float] = {}  # (tensor_io.py _held_off)
        self.averager = None
        self.endpoint: Endpoint | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping stage worker job=%s stage=%d reason=%s", self.a.job_id, self.a.stage, reason or "-")
        self.stop_event.set()

    def on_fence(self, switch_step: int, *, all_live: bool = False, live_members: tuple[int, ...] = (),
                 dropped: tuple = ()) -> None:
        """The coordinator fences this attempt (seen in an assignment poll)."""
        membership = getattr(self, "membership", None)
        if membership is not None:
            membership.on_fence(switch_step, all_live=all_live, live_members=live_members, dropped=dropped)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    # -- lifecycle -----------------------------------------------------------------------------
    def _run(self) -> None:
        a = self.a
        self.membership = Membership(self.client, a, stop=self.stop_event, outage_s=self.outage_s)
        self.reporter = Reporter(self.client, a, on_stop=self.stop, on_ack=self.membership.on_ack,
                                 outage_s=self.outage_s, stop=self.stop_event)
        self.checkpoints = CheckpointWriter(self.client, a, self.dir, outage_s=self.outage_s, stop=self.stop_event)
        # a second copy of other stages' checkpoints, fetched in the background (node/training/kept.py)
        self.keeper = CheckpointKeeper(a, state_dir=self.state_dir, security=self.security, stop=self.stop_event)
        try:
            self._setup()
            try:
                self._train()
            except FenceReached:
                self._fence_stop()
                return
            self._finish()
        except StopRequested:
            pass
        except PeerError as exc:
            if self.stop_event.is_set():
                pass
            else:
                self._failed(exc)
        except Exception as exc:  # noqa: BLE001 -- report every failure to the coordinator
            if not self.stop_event.is_set():
                log.exception("stage worker failed job=%s stage=%d", a.job_id, a.stage)
                self._failed(exc)
        finally:
            self._cleanup()
            self.done.set()

    def _failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("stage worker failed job=%s stage=%d replica=%d: %s", self.a.job_id, self.a.stage, self.a.replica,
                    self.error)
        self.reporter.final(state="failed", error=self.error, blame_node_id=self.blame)

    def _cleanup(self) -> None:
        self.on_metrics(training=None)  # an idle node stops reporting the job it left
        if self.verifier is not None:
            self.verifier.close()
        if self.endpoint is not None:
            self.endpoints.remove(self.endpoint)
        for s in self.senders:
            s.close()
        if self.averager is not None:
            try:
                self.averager.shutdown()
            except Exception:  # noqa: BLE001 -- best effort at shutdown
                log.exception("averager shutdown failed")
        self.reporter.close()
        self.checkpoints.close()
        self.keeper.close()

    def _from_coordinator(self, call):
        """A set-up call to the coordinator, retried through an outage (it may be restarting)."""
        return through_outage(call, outage_s=self.outage_s, stop=self.stop_event)

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested()

    def _train(self) -> None:
        a = self.a
        # a stage shared within the pipeline: each holder runs the schedule filtered to its
        # micro-batches (removing ops only drops ordering edges: no deadlock)
        ops = [op for op in schedule.build(a.spec.schedule, num_micro_batches=self.M, stage=a.stage,
                                           num_stages=a.num_stages) if a.owns(op.micro_batch)]
        own = len({op.micro_batch for op in ops})
        # a holder's gradient covers its share of the pipeline's micro-batches (each weighed 1/M):
        # scaled by holders / pipelines, the plain mean over the stage's holders is the mean over
        # pipelines of each pipeline's whole gradient
        grad_scale = len(a.stage_replicas) / a.num_replicas
        every = a.spec.checkpoint_every
        raw_bytes = self.b * self.S * self.H * 4
        for step in range(a.resume_step, self.total_steps):
            self._check_stop()
            if self.faults.stalls_at(step - a.resume_step):  # SWARM_FAULT stall: silent, still heartbeating
                log.warning("SWARM_FAULT: stalling job=%s at step %d", a.job_id, step)
                self.stop_event.wait()
                raise StopRequested()
            self._cur_step = step
            self.membership.at_boundary(step)  # raises FenceReached at a fence's switch step
            t_step = time.monotonic()
            compute = wait = comm = wait_fw = 0.0
            sent_fw = sent_bw = raw = 0
            mbs = self.order.micro_batches(step, a.pipeline)
            dropped: set[int] = set()  # micro-batches a holder-loss fence dropped from this step
            for op in ops:
                ids = mbs[op.micro_batch]
                if op.micro_batch in dropped:
                    continue
                if op.kind == "F":
                    t0 = time.monotonic()
                    if a.is_first:
                        x = torch.from_numpy(self.dataset.inputs(ids)).to(self.device)
                    else:
                        try:
                            x = self._receive("activation", step, op.micro_batch)
                        except MicroBatchDropped:
                            dropped.add(op.micro_batch)
                            continue
                    labels = torch.from_numpy(self.dataset.labels(ids)).to(self.device) if a.is_last else None
                    t1 = time.monotonic()
                    if not a.is_first:
                        self.verifier.received_activation(step, op.micro_batch, ids, x)
                    out = self.runner.forward(op.micro_batch, x, labels)
                    self.faults.slow_down(time.monotonic() - t1)  # SWARM_FAULT slowdown (tests)
                    t2 = time.monotonic()
                    if out is not None:
                        out = self.faults.corrupt_sent(out)
                        up = self.up_for(op.micro_batch)
                        msg = up.encode_forward(out, ids)
                        # a checked stage's witness: what the next stage will compute on
                        self.verifier.sent_activation(step, op.micro_batch, ids,
                                                      lambda: replay.sent_forward(up, msg, ids), codec=up)
                        sent_fw += self._send(self.next_sender_for(op.micro_batch), "activation", step, op.micro_batch,
                                              ids, msg, a.stage)
                        raw += raw_bytes
                    t3 = time.monotonic()
                    wait_fw += t1 - t0
                else:
                    t0 = time.monotonic()
                    try:
                        g = None if a.is_last else self._receive("gradient", step, op.micro_batch)
                    except MicroBatchDropped:
                        self.runner.discard(op.micro_batch)
                        dropped.add(op.micro_batch)
                        continue
                    t1 = time.monotonic()
                    if g is not None:
                        self.verifier.received_gradient(step, op.micro_batch, ids, g)
                    gin = self.runner.backward(op.micro_batch, g)
                    self.faults.slow_down(time.monotonic() - t1)  # SWARM_FAULT slowdown (tests)
                    t2 = time.monotonic()
                    if gin is not None:
                        gin = self.faults.corrupt_sent(gin)
                        down = self.down_for(op.micro_batch)
                        msg = down.encode_backward(gin, ids)
                        self.verifier.sent_gradient(step, op.micro_batch, ids,
                                                    lambda: replay.sent_backward(down, msg))
                        sent_bw += self._send(self.prev_sender_for(op.micro_batch), "gradient", step, op.micro_batch,
                                              ids, msg, a.stage - 1)
                        raw += raw_bytes
                    t3 = time.monotonic()
                wait += t1 - t0
                compute += t2 - t1
                comm += t3 - t2
            if dropped:
                log.warning("step %d job=%s stage=%d: micro-batch(es) %s dropped (a holder-loss fence: the holder that "
                            "ran them is lost); the step goes on with the others", step, a.job_id, a.stage,
                            sorted(dropped))
            t0 = time.monotonic()
            alone = lambda: self.membership.alone  # noqa: E731 -- a fence that lost a node: each pipeline on its own
            if self.averager is not None:  # a background parameter round (below) ends before the gradient round
                self.averager.collect_parameter_round(abort=alone)
            averaging = self.averager is not None and not alone()
            if averaging:
                self.membership.before_round(step)  # during a fence that lost no node: the next boundary, now
                if grad_scale != 1.0:
                    for p in self.module.parameters():
                        if p.grad is not None:
                            p.grad.mul_(grad_scale)
                self.averager.begin_gradient_round(step)
            # While the replicas' gradient round is in flight (it neither reads nor changes the
            # weights), this stage checks its target and fingerprints its weights: checking hides
            # behind the round's network time instead of adding to the step.
            tr = time.monotonic()
            cost = self.verifier.cost
            checks = self.verifier.check_step(step)  # weights are still this step's
            # what the step ran with: the coordinator weighs checks only between the same weights
            checked = self.verifier.active
            tc = time.monotonic()
            # the sketch alone says whether two replicas ran the same weights (coordinator/jobs/
            # spotchecks.py same_weights: exact copies are 0 apart); the exact-bytes digest, a second
            # pass over the weights every step, is no longer sent (its field stays empty)
            digest = ""
            sketch = self.faults.reported_sketch(param_sketch(self.module.parameters())) if checked else ()
            tw = time.monotonic()
            if averaging:
                self.averager.finish_gradient_round(abort=alone)
            t1 = time.monotonic()
            if self.averager is not None:  # the previous step's parameter round: replicas meet again
                self.averager.apply_parameter_round()
            clip_and_step(self.optimizer, list(self.module.parameters()), step, self.optim_cfg)
            to = time.monotonic()
            if self.averager is not None and (step + 1) % RESYNC_EVERY_STEPS == 0 \
                    and step + 1 < self.total_steps and not self.membership.fence_pending.is_set():
                # every replica at the same steps: replicas a failed round set apart meet again, one
                # step later (the round runs behind the next step's compute; none after the last step)
                self.averager.begin_parameter_round(step)
            t2 = time.monotonic()
            cost["recompute_s"] += tc - tr  # within the round's time when averaging
            cost["weights_s"] += tw - tc
            cost["round_s"] += t1 - tr  # the gradient round's wait, checking included
            cost["resync_s"] += t2 - to
            cost["steps"] += 1
            cost["step_s"] += t2 - t_step
            comm += (t1 - t0) - (tw - tr)  # checking is compute, even while the round is in flight
            compute += (t2 - t1) + (tw - tr)
            mb_losses = [self.runner.losses[m] for m in sorted(self.runner.losses)] if a.is_last else []
            loss = self.runner.step_loss() if a.is_last else None
            step_s = time.monotonic() - t_step
            tokens = (own - len(dropped)) * self.b * self.S
            sent = sent_fw + sent_bw
            self.reporter.progress(pb.ProgressReport(
                job_id=a.job_id, attempt=a.attempt, stage=a.stage, replica=a.replica, step=step,
                kept_step=self.keeper.newest, has_loss=loss is not None, loss=loss if loss is not None else 0.0, tokens_per_s=tokens / step_s,
                bytes_sent=sent, bytes_raw=raw, step_s=step_s, compute_s=compute, wait_s=wait, comm_s=comm,
                state="running", tokens=tokens, bytes_forward=sent_fw, bytes_backward=sent_bw,
                micro_batch_losses=mb_losses, checks=[spot_check_pb(c) for c in checks],
                digests=[pb.TensorDigest(micro_batch=m, what=w, digest=d) for m, w, d in self.verifier.take_commitments()],
                param_digest=digest, param_sketch=sketch,
                wait_activation_s=wait_fw, wait_gradient_s=wait - wait_fw))
            self.on_metrics(training={"job_id": a.job_id, "stage": a.stage, "replica": a.replica, "step": step,
                                      "loss": loss, "tokens_per_s": tokens / step_s, "bytes_sent": sent,
                                      "rejected_tensors": self.endpoint.num_rejected})
            if every and (step + 1) % every == 0 and step + 1 < self.total_steps:
                self._checkpoint(step + 1, final=False)
                self.keeper.submit(step + 1)  # the kept workers checkpoint this step too

    def _finish(self) -> None:
        for s in self._live_senders():
            s.flush()
        c = self.verifier.cost
        if self.verifier.active and c["steps"]:  # where checking's time went (bench/verification.py reads it)
            log.info("spot-check cost job=%s stage=%d replica=%d steps=%d step_s=%.3f recompute_s=%.3f "
                     "weights_s=%.3f resync_s=%.3f witness_s=%.3f round_s=%.3f", self.a.job_id, self.a.stage,
                     self.a.replica, c["steps"], c["step_s"], c["recompute_s"], c["weights_s"], c["resync_s"],
                     c["witness_s"], c["round_s"])
        self._checkpoint(self.total_steps, final=True)
        self.checkpoints.wait()  # the coordinator needs the final copy to assemble the result
        self.reporter.final(state="done")
        log.info("stage worker done job=%s stage=%d replica=%d", self.a.job_id, self.a.stage, self.a.replica)

    def _fence_stop(self) -> None:
        """Stopped at the switch step of a fence: every report out, a full checkpoint at the step
        uploaded, then ``fenced``; the coordinator re-plans from here."""
        step = self.membership.switch_step
        for s in self._live_senders():
            s.flush()
        self.reporter.flush()
        self._merge_survivors(step)
        self._checkpoint(step, final=False, upload_weights=True)
        self.checkpoints.wait()
        self.membership.fenced(step)
        log.info("stage worker fenced job=%s attempt=%d stage=%d replica=%d at step %d", self.a.job_id,
                 self.a.attempt, self.a.stage, self.a.replica, step)

    def _merge_survivors(self, step: int) -> None:
        """A fence that lost a node, stopped at its switch step ``step``: average this stage's
        parameters with the other live replicas of the stage (``Membership.live_members``, from
        the coordinator: coordinator/jobs/churn.py ``live_members``). Since the loss each live
        pipeline stepped with its own gradients, and the re-plan resumes the stage from one
        survivor's upload; merged, every survivor's steps since the loss count (the mean of
        replicas that stepped apart, as a parameter re-sync does), and every survivor's upload
        holds the same weights. Bounded by ``MERGE_TIMEOUT_S``: a member lost meanwhile fails the
        round, and this worker then saves its own weights, as before."""
        live = self.membership.live_members
        if self.averager is None or not live:
            return
        deadline = time.monotonic() + MERGE_TIMEOUT_S
        late = lambda: time.monotonic() > deadline or self.stop_event.is_set()  # noqa: E731
        self.averager.collect_parameter_round(abort=late)  # a re-sync still in flight (its group had the dead member)
        self.averager.apply_parameter_round()
        try:
            ok = self.averager.average_parameters(abort=late, step=step, members=live)
        except ValueError as exc:  # positions that do not fit this group (a coordinator's mistake)
            log.warning("fence: not merging with the live replicas job=%s stage=%d: %s", self.a.job_id, self.a.stage, exc)
            return
        log.info("fence: %s the parameters of %d live replicas job=%s attempt=%d stage=%d replica=%d step=%d",
                 "merged" if ok else "could not merge (own weights kept)", len(live), self.a.job_id, self.a.attempt,
                 self.a.stage, self.a.replica, step)

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint(self, step: int, *, final: bool, upload_weights: bool | None = None) -> None:
        """Snapshot weights, optimizer state and data cursor to CPU; the writer saves them locally
        and sends a copy to the coordinator in the background."""
        a = self.a
        # AdamW state by HF parameter name (swarm/pipeline/optim_state.py): a resumed job may split
        # the layers differently. The data cursor is the step: BatchOrder is a function of it.
        meta = {"job_id": a.job_id, "stage": a.stage, "replica": a.replica, "step": step, "data_cursor": step,
                "layers": [a.first_layer, a.last_layer_excl], "final": final, "optimizer": "optimizer.safetensors"}
        # Replicas hold the same weights and (averaged gradients) optimizer state; one copy per
        # stage is enough for the coordinator, except at a fence (the replica 0 pipeline may be
        # gone) and at the end: a replica lost in the last steps is noticed after the survivors
        # finished, and their finals are then the result (coordinator/jobs/churn.py fence_outrun).
        self.checkpoints.submit(Snapshot(
            step=step, final=final, weights=snapshot_tensors(self.module.hf_state_dict()),
            optimizer=snapshot_tensors(stage_optimizer_state(self.module, self.optimizer)), meta=meta,
            upload_weights=(a.replica == 0 or final) if upload_weights is None else upload_weights))
