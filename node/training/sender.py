"""The sending side of the pipeline data plane on a node (:class:`PeerSender`); the receiving
side is node/training/exchange.py.

A :class:`PeerSender` per neighbour sends tensors in order from one thread (AQ-SGD needs both
sides to apply a sample's messages in the same order), retrying while the peer is unreachable
until ``timeout_s``.

Data plane (issue 16): a PeerSender keeps one persistent ``PipelineStream.Open`` stream to its
neighbour (swarm/transport/streams.py: one message per tensor, acknowledged, re-sent after a
reconnect) and serialises codec messages on its own thread, so the worker's compute thread
only encodes on the device and queues; ``PushTensor`` stays for tensors larger than one gRPC
message. The receiving side of both is :meth:`node.training.exchange.PipelinePeerServicer.take`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from swarm.errors import PeerError, SwarmError
from swarm.proto.v1 import training_pb2_grpc
from swarm.transport import frames, shm, streams
from swarm.transport import tensors as wt
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, data_channel
from swarm.transport.errors import error_from_rpc
from swarm.transport.lazy_channels import RenewingStub
from swarm.transport.tls import PlaintextSecurity

log = logging.getLogger(__name__)


_swept = threading.Lock()
_sweep_done = False


def _sweep_once() -> None:
    """Remove shared-memory slots that killed node processes of this user left (once per process)."""
    global _sweep_done
    with _swept:
        if not _sweep_done:
            _sweep_done = True
            n = shm.sweep()
            if n:
                log.info("removed %d shared-memory slot(s) of node processes that are gone", n)


@dataclass(slots=True)
class _Message:
    """A codec message to serialise on the sender's thread. ``ready``: a CUDA event the host
    copy of its tensors waits for (None when they already are on the host)."""

    fields: dict
    msg: object  # swarm.compression.CodecMessage
    ready: object = None


# Largest frame sent on the persistent stream; larger tensors go through PushTensor's chunks.
MAX_FRAME_BYTES = DATA_MAX_MESSAGE_BYTES - (1 << 20)


class PeerSender:
    """Sends tensors to one neighbour, in order, from a background thread.

    ``send`` (a ready :class:`~swarm.transport.tensors.WireTensor`) and ``send_message`` (a codec
    message, serialised on the sender's thread) queue, blocking when ``max_queued`` tensors wait;
    a failure is kept in ``error`` and re-raised by ``check``. ``flush`` waits until everything
    queued was delivered and acknowledged. ``emulate_bps`` (benchmarks on hosts without ``tc``):
    hold each tensor until it would have crossed a link of that many bits per second (a serial
    link per neighbour).
    """

    def __init__(self, address: str, *, security, node_id: str | None = None, what: str, timeout_s: float,
                 max_queued: int = 16, on_sent: Callable[[int, float], None] | None = None,
                 emulate_bps: float = 0.0) -> None:
        self.emulate_bps = float(emulate_bps)
        self.address = address
        self.node_id = node_id
        self._checksum = isinstance(security, PlaintextSecurity)  # TLS authenticates every record
        self.what = what
        self.timeout_s = timeout_s
        # TLS to the neighbour (its certificate must name ``node_id``), rebuilt after a renewal
        def make_channel():
            return data_channel(address, security=security, node_id=node_id)

        self._stubs = RenewingStub(make_channel, training_pb2_grpc.PipelinePeerStub, security)
        # the persistent stream's method, on a channel of its own, rebuilt after a renewal too
        self._stream_stubs = RenewingStub(make_channel, streams.open_method, security)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._on_sent = on_sent
        self.error: SwarmError | None = None
        self.bytes_sent = 0
        self.send_s = 0.0
        self._closed = False
        self._link_free_at = 0.0  # emulate_bps: when the emulated link has sent what it holds
        slots = None
        if shm.enabled() and shm.is_local_address(address) and not emulate_bps:  # a neighbour on this host
            _sweep_once()
            slots = shm.ShmSlots(max_queued)
        self._stream = streams.StreamSender(lambda: self._stream_stubs.stub, what=what, timeout_s=timeout_s, window=max_queued,
                                            on_acked=self._acked, fallback=self._push, shm_slots=slots)
        self._thread = threading.Thread(target=self._run, name=f"send-{what}", daemon=True)
        self._thread.start()

    def send(self, wire: wt.WireTensor) -> None:
        self.check()
        self._queue.put(wire)

    def try_send(self, wire: wt.WireTensor) -> bool:
        """Queue ``wire`` unless the sender failed or its queue is full (never blocks): for
        best-effort copies, such as spot-check witnesses, that must not hold up training."""
        if self.error is not None:
            return False
        try:
            self._queue.put_nowait(wire)
        except queue.Full:
            return False
        return True

    def send_message(self, msg, ready=None, **fields) -> None:
        """Queue a codec message; ``fields`` are the TensorHeader's but for the payload size and
        checksum, which the sender's thread fills in while it serialises the message."""
        self.check()
        self._queue.put(_Message(fields=fields, msg=msg, ready=ready))

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._stream.error is not None:
            raise self._stream.error

    def flush(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"sending to {self.what} did not finish within the timeout")
                self._queue.all_tasks_done.wait(min(left, 0.2))
        self._stream.flush(max(0.0, deadline - time.monotonic()))
        self.check()

    def _acked(self, num_bytes: int, seconds: float) -> None:
        self.bytes_sent += num_bytes
        self.send_s += seconds
        if self._on_sent is not None:
            self._on_sent(num_bytes, seconds)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                if self.error is None:
                    self._forward(item)
            except SwarmError as exc:
                self.error = exc
                log.warning("sending to %s failed: %s", self.what, exc)
            finally:
                self._queue.task_done()

    def _forward(self, item) -> None:
        """Serialise one queued tensor and put it on the stream (PushTensor when too large)."""
        if isinstance(item, _Message):
            if item.ready is not None:
                item.ready.synchronize()  # the device-to-host copy the worker started
            parts = item.msg.buffers()
            header = frames.payload_header(parts, checksum=self._checksum, **item.fields)
        else:
            parts, header = [item.payload], item.header
        self._emulate(header.payload_bytes)
        if header.payload_bytes > MAX_FRAME_BYTES:
            self._stream.flush()  # keep the order: everything before it has arrived
            self._deliver(wt.WireTensor(header=header, payload=b"".join(parts)))
            return
        self._stream.send_parts(header, parts)

    def _push(self, header: wt.TensorHeader, payload) -> None:
        self._deliver(wt.WireTensor(header=header, payload=bytes(payload)))

    def _emulate(self, num_bytes: int) -> None:
        if self.emulate_bps <= 0:
            return
        now = time.monotonic()
        self._link_free_at = max(self._link_free_at, now) + num_bytes * 8 / self.emulate_bps
        if self._link_free_at > now:
            time.sleep(self._link_free_at - now)

    def _deliver(self, wire: wt.WireTensor) -> None:
        deadline = time.monotonic() + self.timeout_s
        backoff = 0.05
        while True:
            t0 = time.monotonic()
            try:
                # accepted=False: a straggler the receiver dropped (it runs a newer attempt)
                self._stubs.stub.PushTensor(wt.to_chunks(wire), timeout=max(1.0, deadline - t0))
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
            self._stream.close()
            self._stubs.close()
            self._stream_stubs.close()
