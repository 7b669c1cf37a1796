"""The pipeline data plane on a node: receiving tensors from neighbours and sending ours.

Protocol (``PipelinePeer.PushTensor``, one stream per tensor): the sender streams the chunks
of one :class:`~swarm.transport.tensors.WireTensor` whose payload is a codec message; the
receiver reassembles it (size, CRC), looks up the stage worker of that job
(:class:`Endpoint`), which checks every header field against its assignment (job, kind,
sender, boundary, replica, step window, micro-batch, sample ids, shape, dtype, codec), decodes
it with its boundary codec, rejects NaN/Inf, and queues the tensor for the worker. Any mismatch
answers INVALID_ARGUMENT naming the field, and nothing of the tensor is used.

A :class:`PeerSender` per neighbour sends tensors in order from one thread (AQ-SGD needs both
sides to apply a sample's messages in the same order), retrying while the peer is unreachable
until ``timeout_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from swarm.errors import InvalidRequestError, PeerError, SwarmError, UnavailableError
from swarm.proto.v1 import tensor_pb2, training_pb2_grpc
from swarm.transport import tensors as wt
from swarm.transport.channels import data_channel
from swarm.transport.errors import error_from_rpc, grpc_errors

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slot:
    tensor: torch.Tensor


class Endpoint:
    """What one stage worker accepts, and the queue of accepted tensors.

    ``accept(header, payload)`` runs in gRPC threads: ``validate`` (a callable from the worker)
    checks the header and decodes the payload into a tensor, or raises InvalidRequestError.
    """

    def __init__(self, job_id: str, validate: Callable[[wt.TensorHeader, bytes], torch.Tensor],
                 precheck: Callable[[wt.TensorHeader], object] | None = None) -> None:
        self.job_id = job_id
        self._validate = validate
        self._precheck = precheck
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int, int], _Slot] = {}
        self._lock = threading.Lock()  # one decode at a time: codec state is not thread-safe
        self.num_rejected = 0
        self.last_rejection = ""
        self.bytes_received = 0

    def precheck(self, header: wt.TensorHeader) -> None:
        """Refuse a tensor from its header alone, before its payload is read."""
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

    def __init__(self, endpoints: Endpoints, *, max_payload_bytes: int = wt.DEFAULT_MAX_PAYLOAD_BYTES,
                 traffic=None) -> None:
        self.endpoints = endpoints
        self.max_payload_bytes = max_payload_bytes
        self.traffic = traffic  # node.traffic.Traffic or None: counts what arrived, accepted or not

    @grpc_errors
    def PushTensor(self, request_iterator, context) -> tensor_pb2.TensorAck:
        found: list[Endpoint] = []

        def on_header(header: wt.TensorHeader) -> None:  # refuse before reading the payload
            ep = self.endpoints.get(header.job_id)
            ep.precheck(header)
            found.append(ep)

        wire = wt.from_chunks(request_iterator, max_payload_bytes=self.max_payload_bytes, on_header=on_header)
        if self.traffic is not None:
            self.traffic.add_received(len(wire.payload))
        found[0].accept(wire.header, wire.payload)
        return tensor_pb2.TensorAck(accepted=True, received_bytes=len(wire.payload))


class PeerSender:
    """Sends tensors to one neighbour, in order, from a background thread.

    ``send`` queues (blocking when ``max_queued`` tensors wait); a failure is kept in ``error``
    and re-raised by ``check``. ``flush`` waits until everything queued was delivered.
    ``emulate_bps`` (benchmarks on hosts without ``tc``): hold each delivery until the payload
    would have crossed a link of that many bits per second (a serial link per neighbour).
    """

    def __init__(self, address: str, *, what: str, timeout_s: float, max_queued: int = 16,
                 on_sent: Callable[[int, float], None] | None = None, emulate_bps: float = 0.0) -> None:
        self.emulate_bps = float(emulate_bps)
        self.address = address
        self.what = what
        self.timeout_s = timeout_s
        self._channel = data_channel(address)
        self._stub = training_pb2_grpc.PipelinePeerStub(self._channel)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._on_sent = on_sent
        self.error: SwarmError | None = None
        self.bytes_sent = 0
        self.send_s = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"send-{what}", daemon=True)
        self._thread.start()

    def send(self, wire: wt.WireTensor) -> None:
        self.check()
        self._queue.put(wire)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while self._queue.unfinished_tasks:
            self.check()
            if time.monotonic() > deadline:
                raise PeerError(f"sending to {self.what} did not finish within the timeout")
            time.sleep(0.005)
        self.check()

    def _run(self) -> None:
        while True:
            wire = self._queue.get()
            if wire is None:
                self._queue.task_done()
                return
            try:
                if self.error is None:
                    self._deliver(wire)
            except SwarmError as exc:
                self.error = exc
                log.warning("sending to %s failed: %s", self.what, exc)
            finally:
                self._queue.task_done()

    def _deliver(self, wire: wt.WireTensor) -> None:
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.05
        while True:
            t0 = time.monotonic()
            try:
                self._stub.PushTensor(wt.to_chunks(wire), timeout=max(1.0, deadline - t0))
                if self.emulate_bps > 0:
                    hold = len(wire.payload) * 8 / self.emulate_bps - (time.monotonic() - t0)
                    if hold > 0:
                        time.sleep(hold)
                dt = time.monotonic() - t0
                self.bytes_sent += wire.header.payload_bytes
                self.send_s += dt
                if self._on_sent is not None:
                    self._on_sent(wire.header.payload_bytes, dt)
                return
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, self.what)
                if not err.retryable or time.monotonic() + backoff > deadline:
                    raise PeerError(f"{self.what} refused or did not take a tensor: {err}") from exc
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._channel.close()
