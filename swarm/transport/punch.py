"""Hole punching between two nodes behind NAT: TCP simultaneous open, met through their relay.

Protocol (relay side: swarm/transport/relay.py, messages: protos/swarm/proto/v1/relay.proto):

1. Dialler A asks its relay to ``Punch`` peer B (both listen on that relay); B hears of it
   on its Listen stream. Both get the same one-time 128-bit punch id.
2. :func:`rendezvous`: each binds a local port P (SO_REUSEADDR + SO_REUSEPORT), connects
   from P to the relay port and sends ``SWPUNCH1`` + id + role. The relay answers each with the
   other's address as IT saw it (the NAT's public side: Linux MASQUERADE, like most home
   routers, keeps the source port when it can, so the same P maps to the same public port).
3. :func:`simultaneous_open`: both connect() from P to the other's public address at once, for
   a few seconds. Each router has then seen its own side's outgoing SYN, so the other's SYN
   matches that connection's entry and is let in (a router that drops unsolicited inbound
   connections still passes it); the two SYNs cross and TCP completes one connection.
4. The dialler's gRPC connection runs over the punched socket through :class:`PunchBridge`;
   the acceptor splices the punched socket with its own peer server. TLS is end to end as
   over the relay (the bridge routes by SNI just like the relay), so a punched path is exactly
   as trusted as a relayed one: nobody but B can complete the handshake.

Why TCP simultaneous open over UDP/QUIC or libp2p's DCUtR: grpc runs on TCP and TLS here, so a
punched TCP socket carries the very same bytes with one identity and no second transport or
daemon; it works through NATs that keep ports (MASQUERADE, most home routers) and falls back to
the relay through the same bridge when it does not (symmetric NATs, firewalls that reset).

:class:`PunchBridge` is where a relayed node's gRPC channels to OTHER nodes on its relay go
(``security.route``, swarm/transport/channels.py): a loopback listener that reads the
ClientHello's server name (swarm/transport/sni.py), punches to that node and splices; when the
punch fails it connects to the relay instead, so a channel never notices which path it got.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from swarm.transport.relay import (
    CONNECTION_ID_BYTES, PUNCH_MAGIC, _read_head, node_id_from_server_name,
)
from swarm.transport.sni import NotClientHello
from swarm.transport.splice import close_quietly, splice

log = logging.getLogger(__name__)

DIALLER, ACCEPTOR = 0, 1
PUNCH_TIMEOUT_S = 5.0
MAX_REPLY_BYTES = 64


def _socket_on(port: int, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    return s


def parse_endpoint(line: bytes) -> tuple[str, int]:
    """The relay's answer ``b"<ip> <port>\\n"`` -> (ip, port); ValueError for anything else."""
    text = line.decode("ascii").strip()
    host, _, port = text.partition(" ")
    ip = ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return str(ip), int(port)


def rendezvous(relay: tuple[str, int], punch_id: bytes, role: int, *, timeout_s: float = PUNCH_TIMEOUT_S
               ) -> tuple[socket.socket, int, tuple[str, int]]:
    """Meet the other side at the relay: (the rendezvous socket, keep it open until the punch is
    done; the local port; the other side's public address). Raises OSError / ValueError."""
    if len(punch_id) != CONNECTION_ID_BYTES or role not in (DIALLER, ACCEPTOR):
        raise ValueError("a punch id is 16 bytes and the role 0 or 1")
    s = _socket_on(0)
    try:
        s.settimeout(timeout_s)
        s.connect(relay)
        s.sendall(PUNCH_MAGIC + punch_id + bytes([role]))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(MAX_REPLY_BYTES - len(reply))
            if not chunk or len(reply) + len(chunk) >= MAX_REPLY_BYTES:
                raise ValueError("the relay closed the rendezvous without the other side's address")
            reply += chunk
        return s, s.getsockname()[1], parse_endpoint(reply)
    except BaseException:
        s.close()
        raise


def simultaneous_open(local_port: int, peer: tuple[str, int], *, timeout_s: float = PUNCH_TIMEOUT_S,
                      stop: threading.Event | None = None) -> socket.socket | None:
    """connect() from ``local_port`` to ``peer`` until it succeeds or ``timeout_s`` passes: the
    connected socket, or None."""
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s = _socket_on(local_port)
        s.settimeout(min(left, 2.0))
        try:
            s.connect(peer)
            s.settimeout(None)
            return s
        except OSError:
            s.close()
            stop.wait(0.05)  # refused or reset: the other side's SYN is not out yet; try again
    return None


def punch(relay: tuple[str, int], punch_id: bytes, role: int, *, timeout_s: float = PUNCH_TIMEOUT_S
          ) -> socket.socket | None:
    """One side of a hole punch: the connected socket to the other node, or None (use the relay)."""
    try:
        rv, port, peer = rendezvous(relay, punch_id, role, timeout_s=timeout_s)
    except (OSError, ValueError) as exc:
        log.info("hole punching: no rendezvous at the relay: %s", exc)
        return None
    try:
        return simultaneous_open(port, peer, timeout_s=timeout_s)
    finally:
        rv.close()


class PunchStats:
    """The path to each peer as the latest punch left it, live punched connections, and attempt
    counts (heartbeat metrics: ``punched_peers`` are the peers whose latest punch, either way,
    succeeded; new connections to them punch again). Thread-safe."""

    MAX_PEERS = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: Counter[str] = Counter()
        self._last: dict[str, bool] = {}
        self.attempts = self.successes = 0

    def attempt(self, peer: str, ok: bool) -> None:
        with self._lock:
            self.attempts += 1
            self.successes += int(ok)
            self._last.pop(peer, None)
            self._last[peer] = ok
            while len(self._last) > self.MAX_PEERS:
                del self._last[next(iter(self._last))]

    def opened(self, peer: str) -> None:
        with self._lock:
            self._live[peer] += 1

    def closed(self, peer: str) -> None:
        with self._lock:
            self._live[peer] -= 1
            if self._live[peer] <= 0:
                del self._live[peer]

    def metrics(self) -> dict:
        with self._lock:
            return {"punched_peers": sorted(p for p, ok in self._last.items() if ok),
                    "punched_connections": sum(self._live.values()),
                    "punch_attempts": self.attempts, "punch_successes": self.successes}


def accept_punch(relay: tuple[str, int], punch_id: bytes, peer: str, local: tuple[str, int], stats: PunchStats) -> None:
    """The acceptor's side: punch, then splice the punched socket with the local peer server."""
    sock = punch(relay, punch_id, ACCEPTOR)
    stats.attempt(peer, sock is not None)
    if sock is None:
        return
    try:
        server = socket.create_connection(local, timeout=5)
    except OSError:
        close_quietly(sock)
        return
    stats.opened(peer)
    try:
        splice(sock, server)
    finally:
        stats.closed(peer)
        close_quietly(sock)
        close_quietly(server)


class PunchBridge:
    """A loopback listener standing in for every node on this node's relay (see the module
    docstring). ``request_punch(node_id)`` returns a punch id (or raises); ``relay`` is the relay
    port. ``enabled=False`` (``--no-hole-punching``): always the relay path."""

    def __init__(self, *, relay: tuple[str, int], request_punch: Callable[[str], bytes], stats: PunchStats,
                 enabled: bool = True) -> None:
        self.relay, self._request_punch, self.stats, self.enabled = relay, request_punch, stats, enabled
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="punch-bridge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:  # close() alone does not wake a thread blocked in accept() (Linux): shutdown does
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="punch-bridge-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = None
        peer = None
        try:
            head, node_id, _ = _read_head(conn, PUNCH_TIMEOUT_S)
            if node_id is None:
                return
            if self.enabled:
                try:
                    upstream = punch(self.relay, self._request_punch(node_id), DIALLER)
                except Exception as exc:  # noqa: BLE001 -- any failure means: take the relay
                    log.info("hole punching to %s not started: %s", node_id[:12], exc)
                self.stats.attempt(node_id, upstream is not None)
            if upstream is not None:
                peer = node_id
                self.stats.opened(peer)
                log.info("hole punched to node %s: direct path through both NATs", node_id[:12])
            else:
                upstream = socket.create_connection(self.relay, timeout=PUNCH_TIMEOUT_S)
            upstream.sendall(head)
            splice(conn, upstream)
        except (OSError, NotClientHello) as exc:
            log.debug("punch bridge connection ended: %s", exc)
        finally:
            if peer is not None:
                self.stats.closed(peer)
            close_quietly(conn)
            if upstream is not None:
                close_quietly(upstream)


__all__ = ["PunchBridge", "PunchStats", "accept_punch", "node_id_from_server_name", "punch", "rendezvous",
           "simultaneous_open"]
