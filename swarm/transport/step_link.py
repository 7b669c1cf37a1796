"""One link of an inference chain: a persistent ``StepStream`` call carrying steps to a stage.

Protocol (the caller's side of ``InferenceStage.StepStream``): the coordinator's driver keeps one
link to the first stage of its chain, and every stage keeps one link to the next stage for each
stream it serves. A step is one request message; the stage answers it with one reply message
before it reads the next (reply k answers request k), so a hop costs one message each way: no
call setup, no new HTTP/2 stream, no server thread hand-off per step as a unary call has.

- The stream is opened on the first step (with the chain's step capability as metadata, which
  the stage checks like a unary Step's) and kept open; :meth:`StepLink.close` ends it.
- A failed step ends the stream: the stage aborts it with the status a unary Step would return
  (mapped back to our errors by :func:`~swarm.transport.errors.error_from_rpc`). The next step
  opens a new stream, so the caller's error handling is the one it has for unary calls.
- A step not answered within ``timeout_s`` cancels the stream (a watchdog thread checks links
  with a step in flight every :data:`WATCH_INTERVAL_S`), so a hung stage fails like a unary
  call past its deadline.
- Stages cancel streams idle for longer than their ``--stream-idle-timeout-s`` (60 s by default,
  swarm/transport/limits.py); a link idle for :data:`REOPEN_IDLE_S` or whose stream has ended
  opens a new one before sending, so an idle chain never fails its next step for that.
- Given a ``wire`` (:class:`~swarm.transport.step_wire.WireTarget`), the link carries its steps
  over the stage's step wire instead (the same steps and checks without gRPC's thread hand-offs,
  swarm/transport/step_wire.py): it asks the stage its port and connects; on any failure to
  connect (no wire, port unreachable behind NAT) uses the gRPC stream for
  :data:`WIRE_RETRY_S` before trying again. ``SWARM_STEP_WIRE=0`` turns the wire off.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import grpc

from swarm.errors import PeerError, SwarmError
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport.errors import error_from_rpc
from swarm.transport.step_wire import WireConnection, WireTarget

log = logging.getLogger(__name__)

REOPEN_IDLE_S = 20.0  # well under the stages' default idle-stream timeout (60 s)
WATCH_INTERVAL_S = 0.5
WIRE_RETRY_S = 60.0  # after a wire could not be connected, the gRPC stream this long


def wire_enabled() -> bool:
    return os.environ.get("SWARM_STEP_WIRE", "1") != "0"
_END = object()


class StepLink:
    """A persistent step stream to one stage. One step in flight at a time (the caller's thread
    blocks in :meth:`step`); not shared between threads."""

    def __init__(self, open_stream: Callable[..., object], *, metadata, what: str,
                 wire: WireTarget | None = None) -> None:
        """``open_stream``: a stub's ``StepStream`` method (``open_stream(requests, metadata=...)``);
        ``metadata``: sent when the stream opens; ``what`` names the stage in errors; ``wire``:
        the stage's step wire, tried first (None or ``SWARM_STEP_WIRE=0``: gRPC only)."""
        self._open_stream = open_stream
        self._metadata = metadata
        self.what = what
        self._wire_target = wire if wire_enabled() else None
        self._wire: WireConnection | None = None
        self._wire_failed_s = -WIRE_RETRY_S
        self.transport = "grpc"  # of the last step: "grpc" or "wire"
        # the stage said (StepWire) that it reads hidden states sent raw; False until it did (an
        # older node, or a link that never reached its StepWire call): send chunks
        self.raw_hidden = False
        self._requests: queue.SimpleQueue | None = None
        self._responses = None
        self._last_used_s = 0.0
        self.deadline_s: float | None = None  # monotonic deadline of the step in flight (watchdog)
        self.num_opened = 0

    def step(self, request: pb.ServeStepRequest, *, timeout_s: float) -> pb.ServeStepReply:
        """Send one step and wait for its reply. Raises the SwarmError the stage answered with
        (the stream is closed then; the next step opens a new one)."""
        now = time.monotonic()
        wire = self._connected_wire(now)
        if wire is not None:
            self.transport = "wire"
            try:
                return wire.step(request, timeout_s=timeout_s)
            finally:
                if wire.closed:
                    self._wire = None
        self.transport = "grpc"
        if self._responses is not None and (self._responses.done() or now - self._last_used_s > REOPEN_IDLE_S):
            self.close()
        if self._responses is None:
            self._open()
        self.deadline_s = now + timeout_s
        try:
            self._requests.put(request)
            reply = next(self._responses)
        except grpc.RpcError as exc:
            timed_out = self.deadline_s is None
            self.close()
            if timed_out:
                raise PeerError(f"{self.what} did not answer a step within {timeout_s:g} s") from exc
            raise error_from_rpc(exc, self.what) from exc
        except StopIteration:
            self.close()
            raise PeerError(f"{self.what} ended its step stream without answering") from None
        finally:
            self.deadline_s = None
        self._last_used_s = time.monotonic()
        return reply

    def _connected_wire(self, now: float) -> WireConnection | None:
        """The step wire to use for this step, connected now if needed; None: use gRPC."""
        if self._wire is not None or self._wire_target is None or now - self._wire_failed_s < WIRE_RETRY_S:
            return self._wire
        target = self._wire_target
        try:
            answer = target.ask()
            self.raw_hidden = bool(answer.raw_hidden)
            port = int(answer.port)
            if not 0 < port <= 65535:
                raise PeerError("it has no step wire")
            self._wire = WireConnection(target, port, metadata=self._metadata, what=self.what)
        except (OSError, SwarmError, grpc.RpcError) as exc:  # ssl.SSLError is an OSError
            self._wire_failed_s = now
            log.info("step wire to %s not usable (%s); steps go over gRPC for %.0f s", self.what,
                     exc.details() if isinstance(exc, grpc.RpcError) else exc, WIRE_RETRY_S)
            return None
        self.num_opened += 1
        if self._responses is not None:  # the gRPC stream is not needed any more
            self._close_stream()
        return self._wire

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def messages() -> Iterator[pb.ServeStepRequest]:
            while True:
                m = requests.get()
                if m is _END:
                    return
                yield m

        self._requests = requests
        self._responses = self._open_stream(messages(), metadata=self._metadata)
        self.num_opened += 1
        _watchdog().add(self)

    def cancel_if_late(self, now_s: float) -> bool:
        """Cancel the stream if the step in flight is past its deadline (the watchdog's call)."""
        deadline, responses = self.deadline_s, self._responses
        if deadline is None or now_s <= deadline or responses is None:
            return False
        self.deadline_s = None  # tells step() that the cancellation was a timeout
        responses.cancel()
        return True

    def close(self) -> None:
        """End the stream and the wire (idempotent)."""
        if self._wire is not None:
            self._wire.close()
            self._wire = None
        self._close_stream()

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)
        if self._responses is not None:
            self._responses.cancel()
        self._requests = self._responses = None


class _Watchdog:
    """Cancels the stream of any link whose step in flight passed its deadline."""

    def __init__(self) -> None:
        self._links: weakref.WeakSet[StepLink] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, link: StepLink) -> None:
        with self._lock:
            self._links.add(link)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="step-link-watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)  # a periodic tick: deadlines are coarse (seconds to minutes)
            now = time.monotonic()
            with self._lock:
                links = list(self._links)
            for link in links:
                if link.cancel_if_late(now):
                    log.warning("step past its deadline; cancelled the stream to %s", link.what)


_WATCHDOG: _Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def _watchdog() -> _Watchdog:
    global _WATCHDOG
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None:
            _WATCHDOG = _Watchdog()
        return _WATCHDOG
