"""Concurrency limits and idle deadlines for the streaming RPCs of a gRPC server.

A synchronous gRPC server runs each call on a thread of a fixed pool, and a streaming call holds
its thread for as long as the other side keeps the stream open. Without limits, a stranger who
opens as many idle streams as there are threads freezes the server: every later call, Ping and
Heartbeat included, waits in the queue. :class:`StreamGuard` (a server interceptor, installed by
:func:`swarm.transport.channels.make_server`) follows this protocol for every call whose request
or response is a stream:

- at most ``max_streams`` streams run at once, so ``max_workers - max_streams`` threads are
  always left to unary calls (Ping, Register, Heartbeat: the liveness plane);
- at most ``max_streams_per_peer`` of them come from one remote IP address;
- a call over either limit is refused at once with RESOURCE_EXHAUSTED (never queued);
- a stream whose handler has waited on the other side (for its next request message, or for it
  to take the last response message) longer than ``idle_timeout_s`` is cancelled; time the
  handler spends computing does not count.

Unary calls pass untouched: gRPC reads their whole request before it takes a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from swarm.errors import ConfigError, PeerError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """Limits for one server. ``max_streams=0`` means ``max_workers - reserved_workers``."""

    reserved_workers: int = 4  # threads never given to streams, so liveness RPCs always find one
    max_streams: int = 0
    max_streams_per_peer: int = 8
    idle_timeout_s: float = 60.0
    poll_interval_s: float = 0.25  # how often idle streams are looked for

    def __post_init__(self) -> None:
        if self.reserved_workers < 1:
            raise ConfigError("reserved_workers must be >= 1 (a thread for Ping/Heartbeat)")
        if self.max_streams < 0 or self.max_streams_per_peer < 1:
            raise ConfigError("max_streams must be >= 0 and max_streams_per_peer >= 1")
        if not 0.1 <= self.idle_timeout_s <= 86_400:
            raise ConfigError("--stream-idle-timeout-s must be in 0.1..86400")
        if not 0 < self.poll_interval_s <= self.idle_timeout_s:
            raise ConfigError("poll_interval_s must be in (0, idle_timeout_s]")

    def streams_for(self, max_workers: int) -> int:
        """The number of concurrent streams a server with ``max_workers`` threads admits. A small
        pool (tests) keeps half its threads, at least one, for unary calls."""
        if max_workers < 2:
            raise ConfigError("a guarded server needs at least 2 threads (one kept for unary calls)")
        reserved = min(self.reserved_workers, max_workers // 2)
        limit = max_workers - reserved
        return min(self.max_streams, limit) if self.max_streams else limit


def peer_host(peer: str) -> str:
    """The remote host of ``context.peer()`` ('ipv4:1.2.3.4:5', 'ipv6:[::1]:5', 'unix:...')."""
    kind, _, rest = (peer or "").partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer or "?"


class _Slot:
    __slots__ = ("context", "peer", "method", "waiting_since", "cancelled")

    def __init__(self, context, peer: str, method: str) -> None:
        self.context = context
        self.peer = peer
        self.method = method
        self.waiting_since: float | None = None  # monotonic time the handler began waiting on the peer
        self.cancelled = False


class _WatchedIterator:
    """A request iterator that tells the guard when the handler waits on the peer."""

    def __init__(self, it, slot: _Slot, idle_timeout_s: float) -> None:
        self._it = iter(it)
        self._slot = slot
        self._idle_timeout_s = idle_timeout_s

    def __iter__(self):
        return self

    def __next__(self):
        self._slot.waiting_since = time.monotonic()
        try:
            return next(self._it)
        except grpc.RpcError as exc:
            if self._slot.cancelled:
                raise PeerError(f"the stream was idle for more than {self._idle_timeout_s:g} s and was cancelled") from exc
            raise
        finally:
            self._slot.waiting_since = None


class StreamGuard(grpc.ServerInterceptor):
    """Server interceptor enforcing :class:`StreamLimits` (see the module docstring)."""

    def __init__(self, limits: StreamLimits, *, max_workers: int) -> None:
        self.limits = limits
        self.max_streams = limits.streams_for(max_workers)
        self._lock = threading.Lock()
        self._slots: set[_Slot] = set()
        self._per_peer: Counter[str] = Counter()
        self._reaper: threading.Thread | None = None
        self.num_refused = 0
        self.num_idle_cancelled = 0

    # -- bookkeeping -----------------------------------------------------------------------------
    def _admit(self, context, method: str) -> _Slot:
        peer = peer_host(context.peer())
        if peer in ("127.0.0.1", "::1"):
            # A relayed node's peers all arrive from loopback (its end of the relay splice,
            # swarm/transport/relay.py): tell them apart by their verified certificate instead.
            uris = (context.auth_context() or {}).get("peer_uri", ())
            if uris:
                peer = f"{peer}/{uris[0].decode(errors='replace')[:120]}"
        with self._lock:
            if len(self._slots) >= self.max_streams:
                reason = f"this server runs at most {self.max_streams} streams at once and all are busy"
            elif self._per_peer[peer] >= self.limits.max_streams_per_peer:
                reason = (f"this server runs at most {self.limits.max_streams_per_peer} streams at once per "
                          f"remote address and {peer} has that many open")
            else:
                slot = _Slot(context, peer, method)
                self._slots.add(slot)
                self._per_peer[peer] += 1
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="stream-reaper", daemon=True)
                    self._reaper.start()
                return slot
            self.num_refused += 1
        log.info("stream refused method=%s peer=%s: %s", method, peer, reason)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{reason}; close idle streams or retry later")
        raise AssertionError("context.abort returned")  # abort always raises

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.discard(slot)
                self._per_peer[slot.peer] -= 1
                if self._per_peer[slot.peer] <= 0:
                    del self._per_peer[slot.peer]

    def _reap(self) -> None:
        """Cancel streams idle too long; exits when no stream is open (restarted by the next one)."""
        idle_s = self.limits.idle_timeout_s
        while True:
            time.sleep(self.limits.poll_interval_s)  # a periodic tick, not a wait for a condition
            now = time.monotonic()
            with self._lock:
                if not self._slots:
                    self._reaper = None
                    return
                idle = [s for s in self._slots if not s.cancelled and s.waiting_since is not None
                        and now - s.waiting_since > idle_s]
                for s in idle:
                    s.cancelled = True
            for s in idle:
                self.num_idle_cancelled += 1
                log.info("cancelling idle stream method=%s peer=%s (waited on the peer > %.1f s)", s.method, s.peer, idle_s)
                s.context.cancel()

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._slots)

    # -- interception ----------------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = handler_call_details.method
        idle_s = self.limits.idle_timeout_s
        guard = self

        def watch_responses(responses, slot: _Slot):
            for response in responses:
                slot.waiting_since = time.monotonic()  # until gRPC has handed it to the peer and asks again
                yield response
                slot.waiting_since = None

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            def stream_stream(request_iterator, context):
                slot = guard._admit(context, method)
                try:
                    yield from watch_responses(inner(_WatchedIterator(request_iterator, slot, idle_s), context), slot)
                finally:
                    guard._release(slot)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer)

        if handler.request_streaming:
            inner = handler.stream_unary

            def stream_unary(request_iterator, context):
                slot = guard._admit(context, method)
                try:
                    return inner(_WatchedIterator(request_iterator, slot, idle_s), context)
                finally:
                    guard._release(slot)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer)

        inner = handler.unary_stream

        def unary_stream(request, context):
            slot = guard._admit(context, method)
            try:
                yield from watch_responses(inner(request, context), slot)
            finally:
                guard._release(slot)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
