"""gRPC channels made when first needed, and stubs rebuilt when this process's certificate changed.

- :class:`DeferredChannel`: a channel whose factory runs on first use (the factory may fail, e.g.
  while the coordinator's CA cannot be fetched yet; stubs can be built on it before that; a
  failure is raised by the call and the next call tries again).
- :class:`RenewingStub`: a stub on a channel that is rebuilt when the TLS material's
  ``generation`` changed (a renewed node certificate: old connections would present the expired
  one on their next handshake; swarm/transport/tls.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from swarm.errors import UnavailableError


class RenewingStub:
    """A stub on a channel to ``address`` that is rebuilt when this process's certificate was
    renewed (old connections would present the expired one on their next handshake)."""

    def __init__(self, make_channel: Callable[[], grpc.Channel], stub_cls, security) -> None:
        self._make = make_channel
        self._stub_cls = stub_cls
        self._security = security
        self._lock = threading.Lock()
        self._gen = -1
        self._channel: grpc.Channel | None = None
        self._stub = None

    @property
    def stub(self):
        with self._lock:
            if self._stub is None or self._gen != self._security.generation:
                old = self._channel
                self._gen = self._security.generation
                self._channel = self._make()
                self._stub = self._stub_cls(self._channel)
                if old is not None:
                    old.close()
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None


class DeferredChannel(grpc.Channel):
    """A channel made on first use by ``factory`` (which may raise a SwarmError, e.g. while the
    coordinator's CA cannot be fetched yet); stubs can be built on it before that. A factory
    failure is raised by the call and retried by the next one."""

    def __init__(self, factory: Callable[[], grpc.Channel]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._closed = False

    def get(self) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise UnavailableError("the channel to the coordinator is closed")
            if self._channel is None:
                self._channel = self._factory()
            return self._channel

    def _multi(self, kind: str, method: str, request_serializer=None, response_deserializer=None,
               _registered_method=False):
        return _DeferredCallable(self, kind, method, request_serializer, response_deserializer, _registered_method)

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi("unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi("unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi("stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi("stream_stream", method, request_serializer, response_deserializer, _registered_method)

    def subscribe(self, callback, try_to_connect=False):
        self.get().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        if self._channel is not None:
            self._channel.unsubscribe(callback)

    def close(self):
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _DeferredCallable:
    def __init__(self, owner: DeferredChannel, kind: str, method: str, ser, deser, registered) -> None:
        self._owner, self._kind, self._method = owner, kind, method
        self._args = (ser, deser, registered)
        self._real = None
        self._for: grpc.Channel | None = None

    def _resolve(self):
        channel = self._owner.get()
        if self._real is None or self._for is not channel:
            ser, deser, registered = self._args
            self._real = getattr(channel, self._kind)(self._method, request_serializer=ser,
                                                      response_deserializer=deser, _registered_method=registered)
            self._for = channel
        return self._real

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def with_call(self, *args, **kwargs):
        return self._resolve().with_call(*args, **kwargs)

    def future(self, *args, **kwargs):
        return self._resolve().future(*args, **kwargs)
