"""The tensor side of a stage worker (:class:`TensorIO`, a part of
:class:`node.training.worker.StageWorker`): what it accepts from its neighbours and how it sends.

- Receiving (gRPC threads; node/training/exchange.py queues the tensors): only the neighbour the
  coordinator named for this attempt (for the micro-batch, where a stage is shared within the
  pipeline: ``Assignment.prev_for`` / ``next_for``) may push (activations from the previous stage, gradients
  from the next; spot-check copies only from the checked stage's assigned neighbours), the caller
  taken from its TLS certificate. Every header field is checked against the assignment before
  the payload is read: job, kind, shape, dtype, codec, boundary, replica, attempt, sender, a step
  within one of the current one, the micro-batch and its sample ids, and a payload no larger than
  any encoding. The payload is then decoded with the boundary's codec and its shape checked.
- Waiting: a stage waits for an input at most the peer timeout, polling its senders and the
  fence (a switch step reached stops it); a neighbour that stopped answering is blamed.
- Sending: the compute thread only starts the copy of an encoded message to the host; the
  neighbour's sender thread waits for it, frames and sends it. A delivered tensor counts as a link
  observation (bytes / call time: a lower bound of the link's bandwidth).

The host class provides ``a`` (the assignment), the codecs (``downs``, ``ups``: one per neighbour
holder; ``codec_text``), the senders (``prev_senders``, ``next_senders``),
the shapes (``b``, ``S``, ``H``, ``M``), ``order``, ``total_steps``, ``_cur_step``, ``verifier``,
``endpoint``, ``senders``, ``membership``, ``stop_event``, ``timeout_s``, ``traffic``, ``device``
and ``node_id``.
"""

from __future__ import annotations

import time

import torch

from swarm.compression import CodecMessage
from swarm.errors import InvalidRequestError, PeerError, PermissionDeniedError, SwarmError
from swarm.transport import tensors as wt

from node.training.sender import PeerSender
from node.training.spotcheck import WITNESS_KINDS


class MicroBatchDropped(Exception):
    """A holder-loss fence dropped this micro-batch (its lost holder ran it): skip its ops."""


class TensorIO:
    """Receiving and sending tensors for :class:`~node.training.worker.StageWorker`."""

    _sender_failed_at: dict[str, float]  # node id -> when its sender's failure was first seen

    def _on_sent(self, dst_node_id: str):
        """Count a delivered tensor and keep it as a link observation (node/traffic.py).

        The time is the PushTensor call's wall time: it includes the receiver's reassembly,
        validation and decode (not its compute: the receiver only queues the tensor), so
        bytes / seconds is a lower bound of the link's bandwidth; the coordinator only lets
        it raise a link's bandwidth (coordinator/network.py ``transfer_link``)."""
        def on_sent(num_bytes: int, seconds: float) -> None:
            if self.traffic is not None:
                self.traffic.add_sent(num_bytes)
                self.traffic.observe(dst_node_id, num_bytes, seconds)
        return on_sent

    def _authorize_sender(self, caller: str, h: wt.TensorHeader) -> None:
        """Only the neighbour the coordinator named for this attempt may push: activations from
        the previous stage, gradients from the next. ``caller`` comes from its TLS certificate."""
        a = self.a
        if h.kind in WITNESS_KINDS:  # spot-check copies: only from the assigned neighbours of the checked stage
            check = self.verifier.plan.check if self.verifier is not None else None
            if check is None or caller not in check.witness_ids or (h.boundary, h.replica) != (check.stage,
                                                                                               check.replica):
                raise PermissionDeniedError(
                    f"node {caller[:12]} may not send spot-check copies to stage {a.stage} replica {a.replica} of job "
                    f"{a.job_id} attempt {a.attempt}: only the neighbours of the stage it checks may")
            return
        m = h.micro_batch
        expected = {"activation": a.prev_for(m), "gradient": a.next_for(m)}.get(h.kind)
        if expected is None or caller != expected.node_id or not a.owns(m):  # (a stale attempt is the precheck's INVALID_ARGUMENT)
            raise PermissionDeniedError(
                f"node {caller[:12]} may not push {h.kind[:20]}s to stage {a.stage} of job {a.job_id} attempt "
                f"{a.attempt}: only its assigned {'previous' if h.kind == 'activation' else 'next'} stage may")

    def _check_header(self, h: wt.TensorHeader):
        """Check a received header against this assignment, before its payload is read.

        Returns (codec to decode with, the micro-batch's sample ids, expected shape). Raises
        InvalidRequestError naming the first wrong field.
        """
        a = self.a
        if h.kind in WITNESS_KINDS:  # a copy for a spot check this stage runs (node/training/spotcheck.py)
            if self.verifier is None:
                raise InvalidRequestError("this stage is not ready to check")
            return self.verifier.check_header(h)
        if h.kind == "activation":
            if a.is_first:
                raise InvalidRequestError("the first stage takes no activations")
            sender, boundary, codec = a.prev_for(h.micro_batch).node_id, a.stage - 1, self.down_for(h.micro_batch)
        elif h.kind == "gradient":
            if a.is_last:
                raise InvalidRequestError("the last stage takes no gradients")
            sender, boundary, codec = a.next_for(h.micro_batch).node_id, a.stage, self.up_for(h.micro_batch)
        else:
            raise InvalidRequestError(f"a training stage takes activations and gradients, not {h.kind}")
        shape = (self.b, self.S, self.H)
        wt.validate_header(h, wt.TensorExpectation(
            job_id=a.job_id, kind=h.kind, shape=shape, dtype="float32", codec=self.codec_text, boundary=boundary,
            replica=a.pipeline, attempt=a.attempt, sender_ids=frozenset({sender}), num_sample_ids=self.b))
        cur = self._cur_step
        if not (cur <= h.step <= cur + 1 and h.step < self.total_steps):
            raise InvalidRequestError(f"tensor rejected: step is {h.step}, this stage is at step {cur}")
        if not 0 <= h.micro_batch < self.M or not a.owns(h.micro_batch):
            raise InvalidRequestError(f"tensor rejected: micro_batch is {h.micro_batch}, the step has {self.M}"
                                      + (f" of which this holder runs those = {a.share_index} mod {a.share_count}"
                                         if a.share_count > 1 else ""))
        ids = self.order.micro_batches(h.step, a.pipeline)[h.micro_batch]
        if tuple(h.sample_ids) != tuple(int(i) for i in ids):
            raise InvalidRequestError("tensor rejected: sample ids differ from the micro-batch's samples")
        # a codec message is at most the raw float32 tensor plus its headers
        if h.payload_bytes > 4 * self.b * self.S * self.H + 64 * 1024:
            raise InvalidRequestError(f"tensor rejected: payload of {h.payload_bytes} bytes is larger than any encoding")
        return codec, ids, shape

    def _validate(self, h: wt.TensorHeader, payload: bytes) -> torch.Tensor:
        """Check a received tensor against this assignment and decode it (runs in gRPC threads)."""
        if h.kind in WITNESS_KINDS:
            return self.verifier.decode(h, payload)
        codec, ids, shape = self._check_header(h)
        msg = CodecMessage.from_bytes(payload, device=self.device)
        if h.kind == "activation":
            # a spot-checked AQ-SGD job: m(x) before this message, for this stage's commitment
            keep = {} if self.verifier is not None and self.verifier.keeps_refs else None
            t = codec.decode_forward(msg, ids, dtype=torch.float32, expected_row_shape=(self.S, self.H), keep=keep)
            if keep:
                self.verifier.received_ref(h.step, h.micro_batch, keep["rows"], keep["seen"])
        else:
            t = codec.decode_backward(msg, ids, dtype=torch.float32, expected_shape=shape)
        if tuple(t.shape) != shape:
            raise InvalidRequestError(f"tensor rejected: decoded shape {tuple(t.shape)}, expected {shape}")
        return t.to(self.device)

    def _receive(self, kind: str, step: int, m: int) -> torch.Tensor:
        """Micro-batch ``m``'s input of ``kind`` at ``step``, decoded; raises MicroBatchDropped once
        a holder-loss fence dropped ``m`` (it will not come) and FenceReached at a switch step."""
        what = f"stage {self.a.stage - 1 if kind == 'activation' else self.a.stage + 1}"

        def check():
            self._check_senders()
            self.membership.while_waiting(step)  # raises FenceReached at a fence's switch step
            if self.membership.doomed(m):
                raise MicroBatchDropped(m)

        try:
            return self.endpoint.get(kind, step, m, timeout_s=self.timeout_s, stop=self.stop_event, what=what,
                                     check=check)
        except PeerError:
            if not self.stop_event.is_set():  # who stopped answering: the coordinator weighs the blame
                peer = self.a.prev_for(m) if kind == "activation" else self.a.next_for(m)
                self.blame = peer.node_id if peer is not None else ""
            raise

    # -- sending -----------------------------------------------------------------------------------

    def _check_senders(self) -> None:
        """Raise a sender's failure, but for a holder of a shared neighbour stage, for up to the
        peer timeout: the coordinator may yet drop it (a holder-loss fence, coordinator/jobs/churn.py
        ``holder_loss``: it declares a node lost after its node timeout, shorter than a job's peer
        timeout), and then its failure is nobody's concern."""
        gone = self.membership.gone
        for s in self.senders:
            if s.node_id in gone:
                continue
            try:
                s.check()
            except SwarmError:
                if not self._held_off(s):
                    raise

    def _held_off(self, sender: PeerSender) -> bool:
        """``sender`` failed and goes to a holder of a shared stage whose failure is younger than the
        peer timeout (_check_senders)."""
        a = self.a
        shared = {p.node_id for holders in (a.prev_holders, a.next_holders) if len(holders) > 1 for p in holders}
        if sender.node_id not in shared:
            return False
        failed = self._sender_failed_at.setdefault(sender.node_id, time.monotonic())
        return time.monotonic() - failed < self.timeout_s

    def _live_senders(self) -> list[PeerSender]:
        """The senders but those to holders a holder-loss fence dropped (flushing them would fail)."""
        return [s for s in self.senders if s.node_id not in self.membership.gone]

    def _send(self, sender: PeerSender, kind: str, step: int, m: int, ids, msg: CodecMessage, boundary: int) -> int:
        """Queue ``msg`` to ``sender``'s peer; the bytes queued, 0 when skipped: the peer is a holder
        a holder-loss fence dropped, or one that failed recently (_check_senders)."""
        if sender.node_id in self.membership.gone:
            return 0
        try:
            sender.check()
        except SwarmError:
            if self._held_off(sender):
                return 0
            raise
        # The compute thread only starts the (pinned, non-blocking) copy to the host; the
        # sender's thread waits for it, serialises and frames the message (issue 16).
        msg, ready = msg.to_host()
        sender.send_message(msg, ready, job_id=self.a.job_id, step=step, micro_batch=m,
                            sample_ids=tuple(int(i) for i in ids), shape=(self.b, self.S, self.H), dtype="float32",
                            codec=self.codec_text, kind=kind, boundary=boundary, sender_id=self.node_id,
                            replica=self.a.pipeline, attempt=self.a.attempt)
        return msg.nbytes

    # the neighbour holder of micro-batch m (a stage shared within the pipeline has several) and its codec
    def down_for(self, m: int):
        return self.downs[m % len(self.downs)]

    def up_for(self, m: int):
        return self.ups[m % len(self.ups)]

    def prev_sender_for(self, m: int) -> PeerSender:
        return self.prev_senders[m % len(self.prev_senders)]

    def next_sender_for(self, m: int) -> PeerSender:
        return self.next_senders[m % len(self.next_senders)]

    # -- training ----------------------------------------------------------------------------------
