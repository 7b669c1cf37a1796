"""gRPC servers and channels with swarm's limits.

Servers are synchronous (``grpc.server(ThreadPoolExecutor)``). :func:`make_server` builds one
and :func:`bind` binds it to ``host:port`` and returns the port (``port=0`` picks a free one,
so tests never guess ports). Every port and channel is TLS (swarm/transport/tls.py): pass the
process's ``security`` object. Message size limits:

- control plane (coordinator): :data:`CONTROL_MAX_MESSAGE_BYTES`; plugins moving bulk data
  through the coordinator stream it in chunks of at most :data:`CHUNK_BYTES`.
- data plane (node peer server): :data:`DATA_MAX_MESSAGE_BYTES`.

Every server gets a :class:`~swarm.transport.limits.StreamGuard`: streaming calls are limited in
number (overall and per remote IP, refused at once with RESOURCE_EXHAUSTED beyond) and cancelled
when idle, and some threads are always kept for unary calls, so idle streams never delay a Ping
or a Heartbeat.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from swarm.certs import COORDINATOR_DNS, NODE_DNS, node_dns
from swarm.errors import ConfigError
from swarm.transport.limits import StreamGuard, StreamLimits
from swarm.transport.transfer import CHUNK_BYTES  # noqa: F401 -- re-exported for plugins

CONTROL_MAX_MESSAGE_BYTES = 16 << 20
DATA_MAX_MESSAGE_BYTES = 64 << 20

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# gRPC backs off between connection attempts up to 120 s by default, and a call made meanwhile
# fails at once without trying: a node whose coordinator (or a peer) was down half a minute stayed
# cut off ~10 s after it was back, long enough to be declared lost. Capped at 2 s: an attempt is
# one TCP connect (and a TLS handshake once it succeeds).
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
    ]


def make_server(*, max_message_bytes: int, max_workers: int = 32,
                stream_limits: StreamLimits | None = None) -> grpc.Server:
    """A synchronous gRPC server, not yet bound nor started, guarded by ``stream_limits``
    (default :class:`StreamLimits`); the guard is ``server.stream_guard``."""
    guard = StreamGuard(stream_limits or StreamLimits(), max_workers=max_workers)
    options = _size_options(max_message_bytes) + [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=options,
        interceptors=[guard],
        maximum_concurrent_rpcs=max_workers * 8,
    )
    server.stream_guard = guard  # for metrics and tests
    return server


def bind(server: grpc.Server, host: str, port: int, *, security, require_client_auth: bool = True) -> int:
    """Listen with TLS on ``host:port`` (``security``: swarm.transport.tls); return the bound
    port. ``require_client_auth``: only callers with a swarm certificate complete the handshake
    (node peer ports); the coordinator's port passes False. Raises ConfigError if it cannot bind."""
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port {port} is out of range 0..65535")
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = security.add_port(server, target, require_client_auth=require_client_auth)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {target} ({exc}); pick another --port or --host") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {target}; is the port in use? pick another --port")
    return bound


def control_channel(address: str, *, security) -> grpc.Channel:
    """A TLS channel to a coordinator (its certificate must name ``coordinator.swarm``)."""
    return security.channel(address, server_name=COORDINATOR_DNS,
                            options=_size_options(CONTROL_MAX_MESSAGE_BYTES) + _KEEPALIVE + _RECONNECT)


def data_channel(address: str, *, security, node_id: str | None = None) -> grpc.Channel:
    """A TLS channel to a node's peer service; with ``node_id`` its certificate must be that
    node's, else any swarm node's. Presents this process's certificate (peers require one).
    ``security.route`` (a relayed node's hole-punching bridge) may send it another way; the TLS
    name, and so who must answer, stays the same."""
    route = getattr(security, "route", None)
    if node_id and route is not None:
        address = route(address, node_id)
    return security.channel(address, server_name=node_dns(node_id) if node_id else NODE_DNS,
                            options=_size_options(DATA_MAX_MESSAGE_BYTES) + _KEEPALIVE + _RECONNECT)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ConfigError with what to type instead."""
    if not isinstance(address, str) or len(address) > 300:
        raise ConfigError("address must be a string host:port of at most 300 characters")
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigError(f"address {address!r} is not host:port (e.g. 10.0.0.5:7000)")
    if any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"address {address!r} has an invalid host part")
    return host, int(port_text)
