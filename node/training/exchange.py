"""The pipeline data plane on a node, the receiving side: tensors from the neighbours.

Protocol (``PipelinePeer.PushTensor``, one stream per tensor): the sender streams the chunks
of one :class:`~swarm.transport.tensors.WireTensor` whose payload is a codec message; the
receiver first checks WHO sent it: the caller's node id from its TLS certificate must be the
header's sender and the neighbour the coordinator assigned for that job, attempt and kind
(:meth:`Endpoint.authorize`); a refused push gets PERMISSION_DENIED and touches no state (no
duplicate bookkeeping, no codec state, no counters). Then it reassembles the tensor (size,
CRC), looks up the stage worker of that job
(:class:`Endpoint`), which checks every header field against its assignment (job, kind,
sender, boundary, replica, step window, micro-batch, sample ids, shape, dtype, codec), decodes
it with its boundary codec, rejects NaN/Inf, and queues the tensor for the worker. Any mismatch
answers INVALID_ARGUMENT naming the field, and nothing of the tensor is used. Tensors arrive
on a persistent ``PipelineStream`` (:meth:`PipelinePeerServicer.take`) or, when larger than one
gRPC message, through ``PushTensor``; the sending side is node/training/sender.py.

Attempts (plan versions) are checked first: a tensor of an older attempt than the receiving
worker's is a straggler of a plan that was replaced; it is dropped (debug log, ``accepted =
false``) and fails nothing. A tensor of a newer attempt reached a worker that has not switched
yet; it is refused as UNAVAILABLE, which the sender retries. (The start fence of
coordinator/jobs/churn.py makes the second case rare: no worker sends before every worker of
its attempt is ready.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.errors import InvalidRequestError, NotFoundError, PeerError, PermissionDeniedError, UnavailableError
from swarm.proto.v1 import tensor_pb2, training_pb2, training_pb2_grpc
from swarm.transport import shm, streams, transfer, transfer_pb
from swarm.transport import tensors as wt
from swarm.transport.errors import grpc_errors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slot:
    tensor: torch.Tensor


class StaleTensor(Exception):
    """A tensor of an older attempt than the receiver's: dropped without an error."""


class Endpoint:
    """What one stage worker accepts, and the queue of accepted tensors.

    ``accept(header, payload)`` runs in gRPC threads: ``validate`` (a callable from the worker)
    checks the header and decodes the payload into a tensor, or raises InvalidRequestError.
    """

    def __init__(self, job_id: str, validate: Callable[[wt.TensorHeader, bytes], torch.Tensor],
                 precheck: Callable[[wt.TensorHeader], object] | None = None,
                 authorize: Callable[[str, wt.TensorHeader], None] | None = None, attempt: int | None = None) -> None:
        self.job_id = job_id
        self.attempt = attempt  # None: not checked here (the validator does)
        self.num_stale = 0
        self._validate = validate
        self._precheck = precheck
        self._authorize = authorize
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int, int], _Slot] = {}
        self._lock = threading.Lock()  # one decode at a time: codec state is not thread-safe
        self.num_rejected = 0
        self.last_rejection = ""
        self.bytes_received = 0

    def authorize(self, caller: str, header: wt.TensorHeader) -> None:
        """Refuse a push whose caller (from its certificate) is not the header's sender or not the
        assigned neighbour (PermissionDeniedError). Changes nothing: runs before any bookkeeping."""
        if caller != header.sender_id:
            raise PermissionDeniedError(f"node {caller[:12]} sent a tensor in the name of {header.sender_id[:12]}")
        if self._authorize is not None:
            self._authorize(caller, header)

    def check_attempt(self, header: wt.TensorHeader) -> None:
        """Raises StaleTensor (older attempt) or UnavailableError (newer: retry later)."""
        if self.attempt is None or header.attempt == self.attempt or header.attempt == 0:
            return  # 0: unset (attempts start at 1), the validator refuses it with the field named
        if header.attempt < self.attempt:
            self.num_stale += 1
            log.debug("dropping a straggler of attempt %d (this worker runs attempt %d) job=%s kind=%s step=%d",
                      header.attempt, self.attempt, header.job_id, header.kind, header.step)
            raise StaleTensor()
        raise UnavailableError(f"this node still runs attempt {self.attempt} of job {header.job_id}, not "
                               f"{header.attempt} (yet); retry shortly")

    def precheck(self, header: wt.TensorHeader) -> None:
        """Refuse a tensor from its header alone, before its payload is read."""
        self.check_attempt(header)
        if self._precheck is None:
            return
        try:
            self._precheck(header)
        except InvalidRequestError as exc:
            self._reject(header, exc)
            raise

    def _reject(self, header: wt.TensorHeader, exc: Exception) -> None:
        self.num_rejected += 1
        self.last_rejection = str(exc)
        log.warning("tensor rejected job=%s sender=%s: %s", header.job_id, header.sender_id[:12], exc)

    def accept(self, header: wt.TensorHeader, payload: bytes) -> None:
        key = (header.kind, header.step, header.micro_batch)
        try:
            with self._lock:
                with self._cond:
                    if key in self._items:
                        raise InvalidRequestError(
                            f"duplicate {header.kind} for step {header.step} micro-batch {header.micro_batch}")
                tensor = self._validate(header, payload)
                wt.check_finite(tensor, what=f"{header.kind} of step {header.step} micro-batch {header.micro_batch}")
        except InvalidRequestError as exc:
            self._reject(header, exc)
            raise
        with self._cond:
            self._items[key] = _Slot(tensor)
            self.bytes_received += header.payload_bytes
            self._cond.notify_all()

    def discard(self, predicate: Callable[[tuple[str, int, int]], bool]) -> int:
        """Drop queued tensors whose (kind, step, micro_batch) key matches; returns how many."""
        with self._cond:
            keys = [k for k in self._items if predicate(k)]
            for k in keys:
                del self._items[k]
        return len(keys)

    def get(self, kind: str, step: int, micro_batch: int, *, timeout_s: float, stop: threading.Event,
            what: str, check: Callable[[], None] | None = None) -> torch.Tensor:
        """Wait for a tensor; raises PeerError after ``timeout_s``; returns None-free results only.

        ``stop`` aborts the wait (raises PeerError("stopped")); ``check`` runs every slice (e.g. to
        surface a sender's failure).
        """
        key = (kind, step, micro_batch)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._items:
                if stop.is_set():
                    raise PeerError("stopped")
                if check is not None:
                    self._cond.release()
                    try:
                        check()
                    finally:
                        self._cond.acquire()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"no {kind} for step {step} micro-batch {micro_batch} from {what} "
                                    f"within {timeout_s:.0f} s; the peer may have died")
                self._cond.wait(min(left, 0.2))
            return self._items.pop(key).tensor


class Endpoints:
    """Job id -> Endpoint of the stage worker running it on this node."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[str, Endpoint] = {}

    def add(self, ep: Endpoint) -> None:
        with self._lock:
            self._by_job[ep.job_id] = ep

    def remove(self, ep: Endpoint) -> None:
        with self._lock:
            if self._by_job.get(ep.job_id) is ep:
                del self._by_job[ep.job_id]

    def get(self, job_id: str) -> Endpoint:
        with self._lock:
            ep = self._by_job.get(job_id)
        if ep is None:
            # retryable: the stage may still be starting (fetching weights) when a neighbour sends
            raise UnavailableError(f"this node runs no stage of job {job_id!r} (yet)")
        return ep


class PipelinePeerServicer(training_pb2_grpc.PipelinePeerServicer):
    """Receives pushed tensors and hands them to the job's endpoint."""

    def __init__(self, endpoints: Endpoints, *, identify: Callable[[object], str],
                 max_payload_bytes: int = wt.DEFAULT_MAX_PAYLOAD_BYTES, traffic=None, state_server=None) -> None:
        self.endpoints = endpoints
        self.state_server = state_server  # node.training.state_copy.StateServer: FetchStageState
        self.identify = identify  # context -> caller's node id from its certificate (swarm.transport.tls)
        self.max_payload_bytes = max_payload_bytes
        self.traffic = traffic  # node.traffic.Traffic or None: counts what arrived, accepted or not

    @grpc_errors
    def FetchStageState(self, request, context):
        """A replica's stage state at a re-plan's resume step (node/training/state_copy.py)."""
        if self.state_server is None:
            raise NotFoundError("this node serves no stage state")
        paths = self.state_server.files(self.identify(context), request.job_id, request.stage, request.attempt,
                                         step=request.step, replica=request.replica)
        on_bytes = self.traffic.add_sent if self.traffic is not None else None
        yield from transfer_pb.to_messages(transfer.send_files(paths, on_bytes=on_bytes), training_pb2.FileChunk)

    @grpc_errors
    def PushTensor(self, request_iterator, context) -> tensor_pb2.TensorAck:
        found: list[Endpoint] = []
        caller = self.identify(context)

        def on_header(header: wt.TensorHeader) -> None:  # refuse before reading the payload
            ep = self.endpoints.get(header.job_id)
            ep.authorize(caller, header)  # who, before any state is touched
            ep.precheck(header)
            found.append(ep)

        try:
            wire = wt.from_chunks(request_iterator, max_payload_bytes=self.max_payload_bytes, on_header=on_header)
        except StaleTensor:
            return tensor_pb2.TensorAck(accepted=False, reason="stale attempt: dropped")
        if self.traffic is not None:
            self.traffic.add_received(len(wire.payload))
        found[0].accept(wire.header, wire.payload)
        return tensor_pb2.TensorAck(accepted=True, received_bytes=len(wire.payload))

    def take(self, caller: str, header: wt.TensorHeader, payload) -> None:
        """A framing-checked tensor from a persistent stream (``streams.StreamReceiver``) sent by
        ``caller`` (from its certificate): authorize it and precheck its header exactly as
        PushTensor does, then validate, decode and queue it; raises a SwarmError to refuse. A
        straggler of an older attempt is dropped (acknowledged, never applied)."""
        ep = self.endpoints.get(header.job_id)
        ep.authorize(caller, header)  # who, before any state is touched
        try:
            ep.precheck(header)
        except StaleTensor:
            return
        if self.traffic is not None:
            self.traffic.add_received(len(payload))
        ep.accept(header, payload)

    def stream_receiver(self) -> streams.StreamReceiver:
        """The ``PipelineStream`` service feeding :meth:`take`; add its ``handler()`` to the server."""
        return streams.StreamReceiver(self.take, identify=self.identify, max_payload_bytes=self.max_payload_bytes,
                                      shm=shm.ShmReader() if shm.enabled() else None)
