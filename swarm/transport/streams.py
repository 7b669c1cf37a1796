"""Persistent tensor streams between pipeline neighbours (``PipelineStream.Open``).

Protocol. A sender keeps one long-lived bidirectional gRPC stream per (job, attempt,
neighbour), named by a random stream id in the call metadata (``swarm-stream-id``). Each
request message is one :class:`TensorFrame` (training.proto) carrying a whole tensor: a
sequence number (1, 2, 3...), the :class:`~swarm.transport.tensors.TensorHeader` and the
payload. The receiver checks the framing (sizes, CRC-32), hands header and payload to its
``on_frame`` callback (which validates and queues the tensor, or raises), and answers each
frame with a :class:`TensorFrameAck` naming its seq. An error of the callback ends the stream
with the error's status (INVALID_ARGUMENT: the tensor was refused and the sender fails;
UNAVAILABLE: retry later). At most ``window`` frames are unacknowledged at once (flow
control on top of HTTP/2's); when the stream breaks, the sender reopens it (same stream id)
and re-sends every unacknowledged frame in order, retrying for up to ``timeout_s``; the
receiver acknowledges frames whose seq it already applied without applying them again.

The hot path does no per-chunk Python work and copies the payload once on each side: the
sender joins header and payload buffers into one message (the frame is protobuf's wire format,
written by hand, so no protobuf copies), the receiver reads the payload as a slice of the
received message. Tensors larger than one message (``max_frame_bytes``) are for the caller
to send another way (PushTensor's chunks).

Between two nodes of one host the payload travels through shared memory instead
(swarm/transport/shm.py): the frame carries the name of the sender's slot (field 4) in place of
the payload; everything else (seq, header with size and CRC-32, acks, re-sends) is the same. A
receiver that cannot read the slot answers FAILED_PRECONDITION and the sender goes inline.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from swarm.errors import InvalidRequestError, PeerError, SwarmError, UnavailableError
from swarm.transport import shm as shm_mod
from swarm.transport import tensors as wt
from swarm.transport.errors import error_from_rpc, grpc_errors
from swarm.transport.frames import decode_ack, decode_frame, encode_ack, encode_frame, encode_ref_frame

log = logging.getLogger(__name__)

SERVICE = "swarm.proto.v1.PipelineStream"
METHOD = f"/{SERVICE}/Open"
STREAM_ID_KEY = "swarm-stream-id"
MAX_STREAM_ID_CHARS = 64
DEFAULT_WINDOW = 16
_REMEMBERED_STREAMS = 4096  # stream ids whose last applied seq a receiver keeps


# ----------------------------------------------------------------------------- receiver
class StreamReceiver:
    """Serves ``PipelineStream.Open``: every frame goes to ``on_frame(caller, header, payload)``,
    which validates and takes the tensor or raises a SwarmError (mapped to the stream's status).
    ``identify(context)`` names the caller (from its TLS certificate); a stream's sequence state
    is kept per (caller, stream id), so no one can advance another peer's stream.

    Register with ``server.add_generic_rpc_handlers((receiver.handler(),))``."""

    def __init__(self, on_frame: Callable[[str, wt.TensorHeader, memoryview], None], *,
                 identify: Callable[[object], str], max_payload_bytes: int = wt.DEFAULT_MAX_PAYLOAD_BYTES,
                 shm: shm_mod.ShmReader | None = None) -> None:
        """``shm``: reads payloads of senders on this host (None: such frames are refused as
        malformed, and their senders go inline)."""
        self._on_frame = on_frame
        self._shm = shm
        self._identify = identify
        self.max_payload_bytes = max_payload_bytes
        self._lock = threading.Lock()
        # stream id -> [lock, last applied seq]; the lock orders an old and a reconnected stream
        self._streams: collections.OrderedDict[str, list] = collections.OrderedDict()

    def handler(self) -> grpc.GenericRpcHandler:
        # no (de)serializers: frames and acks travel as the raw bytes of their messages
        return grpc.method_handlers_generic_handler(SERVICE, {"Open": grpc.stream_stream_rpc_method_handler(self.Open)})

    def _state(self, stream_id: str) -> list:
        with self._lock:
            st = self._streams.get(stream_id)
            if st is None:
                st = self._streams[stream_id] = [threading.Lock(), 0]
                while len(self._streams) > _REMEMBERED_STREAMS:
                    self._streams.popitem(last=False)
            else:
                self._streams.move_to_end(stream_id)
            return st

    @grpc_errors
    def Open(self, request_iterator, context):
        stream_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == STREAM_ID_KEY and isinstance(value, str):
                stream_id = value
        if not 0 < len(stream_id) <= MAX_STREAM_ID_CHARS:
            raise InvalidRequestError(f"a tensor stream needs a {STREAM_ID_KEY} of 1..{MAX_STREAM_ID_CHARS} characters")
        caller = self._identify(context)  # before any frame is read
        st = self._state(f"{caller}/{stream_id}")
        frames = iter(request_iterator)
        while True:
            try:
                raw = next(frames)
            except StopIteration:
                return
            except grpc.RpcError:  # the sender went away or the server is stopping: not an error here
                if context.is_active():
                    raise
                return
            seq, header, payload = decode_frame(raw, max_payload_bytes=self.max_payload_bytes, shm=self._shm)
            with st[0]:
                if seq > st[1]:
                    self._on_frame(caller, header, payload)
                    st[1] = seq
            yield encode_ack(seq)


# ----------------------------------------------------------------------------- sender
def open_method(channel: grpc.Channel):
    """``PipelineStream.Open`` on ``channel``, frames and acks as raw bytes."""
    return channel.stream_stream(METHOD)


@dataclass(slots=True)
class _Frame:
    seq: int
    data: bytes
    payload_bytes: int
    queued_at: float
    header: wt.TensorHeader | None = None  # a shared-memory frame's header (to re-send it inline)


class StreamSender:
    """Sends frames to one neighbour over one persistent stream, in order, with at most
    ``window`` unacknowledged; reconnects and re-sends on failure (see the module docstring).

    ``send`` blocks while the window is full; a failure is kept in ``error`` and raised by the
    next ``send``/``check``/``flush``. ``on_acked(payload_bytes, seconds)`` runs (in the ack
    thread) for every acknowledged frame, ``seconds`` from ``send`` to its ack.
    """

    def __init__(self, method: Callable[[], Callable], *, what: str, timeout_s: float, window: int = DEFAULT_WINDOW,
                 metadata: Sequence[tuple[str, str]] = (),
                 on_acked: Callable[[int, float], None] | None = None,
                 fallback: Callable[[wt.TensorHeader, bytes], None] | None = None,
                 shm_slots: shm_mod.ShmSlots | None = None) -> None:
        """``fallback(header, payload)`` delivers a tensor another way (PushTensor) to a peer that
        answers UNIMPLEMENTED (a node of an older version): from then on every frame goes there.
        ``shm_slots``: payloads go through shared memory (a neighbour on this host) until the
        receiver says it cannot read them."""
        self._slots = shm_slots
        self.what = what
        self.timeout_s = timeout_s
        self.window = max(1, window)
        self._method = method  # -> the stream's multi-callable (raw bytes both ways), e.g. open_method(channel)
        self._metadata = (*metadata, (STREAM_ID_KEY, uuid.uuid4().hex))
        self._on_acked = on_acked
        self._fallback = fallback
        self.unsupported = False  # the peer has no PipelineStream: frames go to the fallback
        self._cond = threading.Condition()
        self._outbox: collections.deque[_Frame] = collections.deque()
        self._requests: queue.SimpleQueue | None = None  # request queue of the open call
        self._call = None
        self._seq = 0
        self._failing_since: float | None = None
        self._closed = threading.Event()
        self.error: SwarmError | None = None
        self.reconnects = 0

    def next_seq(self) -> int:
        """The seq the next frame must carry (only the sending thread calls this and ``send``)."""
        return self._seq + 1

    @property
    def shared_memory(self) -> bool:
        """True while payloads go through shared memory."""
        return self._slots is not None

    def send_parts(self, header: wt.TensorHeader, parts: Sequence) -> None:
        """Queue the next frame of ``header`` (size and CRC-32 filled in) and payload ``parts``:
        through a shared-memory slot while the receiver reads them, else inline."""
        seq = self.next_seq()
        if self._slots is not None and not self.unsupported:
            self._wait_window()  # the slot of seq - window is free only once that frame was acknowledged
            with self._cond:  # the ack thread cannot switch to inline meanwhile
                slots = self._slots
                if slots is not None:
                    self.check()
                    try:
                        name = slots.put(seq, parts, header.payload_bytes)
                    except OSError as exc:  # /dev/shm is full: this stream goes inline
                        self._go_inline_locked(f"no room for a slot: {exc}")
                    else:
                        self._enqueue_locked(seq, encode_ref_frame(seq, header, name), header.payload_bytes, header)
                        return
        self.send(seq, encode_frame(seq, header, parts), header.payload_bytes)

    def _wait_window(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while len(self._outbox) >= self.window and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"{self.what} acknowledged no tensor within {self.timeout_s:.0f} s; "
                                    "the peer may have died")
                self._cond.wait(min(left, 0.5))
            self.check()

    def send(self, seq: int, data: bytes, payload_bytes: int) -> None:
        """Queue a frame made by :func:`encode_frame` with ``seq == next_seq()``."""
        if seq != self._seq + 1:
            raise ValueError(f"frames go in order: expected seq {self._seq + 1}, got {seq}")
        if self.unsupported:
            self.flush()
            self._seq = seq
            _, header, payload = decode_frame(data, max_payload_bytes=payload_bytes)
            self._fallback(header, payload)  # raises a SwarmError when the peer refuses it
            return
        self._wait_window()
        with self._cond:
            self.check()
            self._enqueue_locked(seq, data, payload_bytes, None)

    def _enqueue_locked(self, seq: int, data: bytes, payload_bytes: int, header: wt.TensorHeader | None) -> None:
        if seq != self._seq + 1:
            raise ValueError(f"frames go in order: expected seq {self._seq + 1}, got {seq}")
        self._seq = seq
        frame = _Frame(seq=seq, data=data, payload_bytes=payload_bytes, queued_at=time.monotonic(), header=header)
        self._outbox.append(frame)
        if self._requests is None:
            self._open_locked()
        else:
            self._requests.put(frame.data)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every frame was acknowledged; raises the sender's error or PeerError."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._outbox and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"sending to {self.what} did not finish within the timeout")
                self._cond.wait(min(left, 0.5))
            self.check()

    @property
    def num_unacked(self) -> int:
        with self._cond:
            return len(self._outbox)

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            call, requests = self._call, self._requests
            self._requests = self._call = None
            self._cond.notify_all()
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()
        if self._slots is not None:
            self._slots.close()

    # -- internals --------------------------------------------------------------------------------
    def _open_locked(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        for f in self._outbox:  # re-send what the previous stream did not acknowledge, in order
            requests.put(f.data)
        self._requests = requests
        self._call = call = self._method()(_drain(requests), metadata=self._metadata)
        threading.Thread(target=self._read_acks, args=(call, requests), name=f"acks-{self.what}", daemon=True).start()

    def _read_acks(self, call, requests: queue.SimpleQueue) -> None:
        exc: BaseException | None = None
        try:
            for raw in call:
                seq = decode_ack(raw)
                done = []
                with self._cond:
                    while self._outbox and self._outbox[0].seq <= seq:
                        done.append(self._outbox.popleft())
                    self._failing_since = None
                    if self._slots is not None:
                        for f in done:
                            if f.header is not None:
                                self._slots.acked(f.seq)
                    self._cond.notify_all()
                if self._on_acked is not None:
                    now = time.monotonic()
                    for f in done:
                        self._on_acked(f.payload_bytes, now - f.queued_at)
        except grpc.RpcError as e:
            exc = e
        except SwarmError as e:  # a malformed ack
            exc = e
        with self._cond:
            if self._requests is requests:
                self._requests = self._call = None
            requests.put(None)  # ends the request iterator of the dead call
            if self._closed.is_set() or not self._outbox:
                return  # idle: the next send opens a new stream
            if self._slots is not None and _refuses_shm(exc):
                self._go_inline_locked(exc)
                exc = UnavailableError(f"{self.what} reads no shared memory; re-sending inline")
            if (isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED
                    and self._fallback is not None):
                self.unsupported = True
                self._go_inline_locked(exc)
                pending = list(self._outbox)
            else:
                pending = None
        if pending is not None:
            self._drain_to_fallback(pending)
            return
        with self._cond:
            err = (error_from_rpc(exc, self.what) if isinstance(exc, grpc.RpcError)
                   else exc if isinstance(exc, SwarmError) else UnavailableError(f"{self.what} closed the stream"))
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            if not err.retryable or now - self._failing_since > self.timeout_s:
                self.error = PeerError(f"{self.what} refused or did not take a tensor: {err}")
                log.warning("tensor stream to %s failed: %s", self.what, err)
                self._cond.notify_all()
                return
            backoff = min(1.0, 0.05 * (2 ** min(self.reconnects, 5)))
        if self._closed.wait(backoff):
            return
        with self._cond:
            if self._requests is None and self._outbox and not self._closed.is_set() and self.error is None:
                self.reconnects += 1
                log.info("reconnecting tensor stream to %s (%d unacknowledged): %s", self.what, len(self._outbox), err)
                self._open_locked()


    def _go_inline_locked(self, why) -> None:
        """Stop using shared memory: every unacknowledged frame is rebuilt with its payload inline."""
        slots, self._slots = self._slots, None
        if slots is None:
            return
        log.info("tensor stream to %s goes inline (no shared memory): %s", self.what,
                 why.details() if isinstance(why, grpc.RpcError) else why)
        for f in self._outbox:
            if f.header is not None:
                f.data = encode_frame(f.seq, f.header, [slots.payload(f.seq, f.payload_bytes)])
                f.header = None
        slots.close()

    def _drain_to_fallback(self, pending: list[_Frame]) -> None:
        """Deliver the unacknowledged frames through the fallback, in order (ack thread)."""
        log.info("%s has no persistent tensor streams; using PushTensor", self.what)
        try:
            for f in pending:
                _, header, payload = decode_frame(f.data, max_payload_bytes=f.payload_bytes)
                self._fallback(header, payload)
        except SwarmError as exc:
            with self._cond:
                self.error = exc if isinstance(exc, PeerError) else PeerError(f"{self.what} refused a tensor: {exc}")
                self._cond.notify_all()
            return
        with self._cond:
            for f in pending:
                if self._outbox and self._outbox[0] is f:
                    self._outbox.popleft()
            self._cond.notify_all()


def _refuses_shm(exc) -> bool:
    """The receiver cannot read our shared-memory slots (another host or user), or is a node of an
    older version that does not know the frame's slot field."""
    if not isinstance(exc, grpc.RpcError):
        return False
    details = exc.details() or ""
    return ((exc.code() == grpc.StatusCode.FAILED_PRECONDITION and shm_mod.UNAVAILABLE_TAG in details)
            or (exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown field after its header" in details))


def _drain(requests: queue.SimpleQueue):
    while True:
        item = requests.get()
        if item is None:
            return
        yield item
