"""A relay for nodes nobody can dial: forwards TLS bytes it can neither read nor alter.

Protocol (the listening side: protos/swarm/proto/v1/relay.proto):

- A relayed node R holds a ``Relay.Listen`` stream to its relay (the coordinator, or a volunteer
  node started with ``--relay``); :meth:`RelayHub.listen` registers it under R's node id.
- A peer P dials R's published address, which is the relay's *relay port*
  (:class:`RelayServer`), exactly as it dials any node: a TLS channel whose server name is
  ``<R id>.node.swarm`` (swarm/transport/channels.py ``data_channel``). The relay reads only the
  first TLS record, takes the server name from the ClientHello (swarm/transport/sni.py) and,
  if R listens, sends R a one-time 128-bit connection id over the Listen stream.
- R opens a new outbound TCP connection to the relay port and sends :data:`MAGIC` + the id
  (:func:`dial_back`); the relay splices P's connection (the buffered ClientHello first) with
  R's, and R splices its end with its own peer server on loopback. TLS (mutual: P presents its
  certificate, R its own) runs end to end between P and R, so the relay learns who talks to
  whom and how much, nothing more; a relay that changed a byte would break the TLS session.

Why SNI routing over a tunnelling RPC: no dialling code changes (a relayed node's address is
simply the relay port), TLS stays end to end without a second encryption layer, and the relay
copies bytes with no protobuf framing (see bench/nat.py for its CPU per Gbit/s).

Limits (nothing freezes or fills the relay): the ClientHello and the dial-back preamble must
arrive within ``hello_timeout_s``; R must dial back within ``connect_timeout_s``; connections
are capped overall and per remote IP; bytes through the relay, both ways, share a token bucket
of ``rate_Bps`` (:class:`TokenBucket`), and are counted per relayed node
(:meth:`RelayHub.usage`). A peer asking for a node that does not listen here is closed at once.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from swarm.certs import NODE_DNS
from swarm.clock import Clock, SystemClock
from swarm.errors import ConfigError
from swarm.identity import is_node_id
from swarm.transport.sni import MAX_HELLO_BYTES, NeedMoreData, NotClientHello, parse_sni
from swarm.transport.splice import BUF_BYTES, TokenBucket, close_quietly, splice

__all__ = ["RelayHub", "RelayLimits", "RelayServer", "TokenBucket", "dial_back", "node_id_from_server_name"]

log = logging.getLogger(__name__)

MAGIC = b"SWRELAY1"  # first bytes of a relayed node's dial-back; a TLS record starts with 0x16
PUNCH_MAGIC = b"SWPUNCH1"  # first bytes of a hole-punching rendezvous (swarm/transport/punch.py)
CONNECTION_ID_BYTES = 16
PREAMBLE_BYTES = len(MAGIC) + CONNECTION_ID_BYTES
PUNCH_PREAMBLE_BYTES = len(PUNCH_MAGIC) + CONNECTION_ID_BYTES + 1  # + role: 0 dialler, 1 acceptor


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayLimits:
    rate_Bps: float = 125e6  # all relayed bytes, both directions together (1 Gbit/s)
    burst_bytes: int = 4 << 20
    hello_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    max_connections: int = 512  # spliced pairs plus handshakes in progress
    max_per_ip: int = 64  # connections from one remote IP (nodes behind one NAT share one)
    max_waiting_per_node: int = 32  # peer connections waiting for one node's dial-back

    def __post_init__(self) -> None:
        if not self.rate_Bps > 0 or self.burst_bytes < BUF_BYTES:
            raise ConfigError(f"relay rate must be > 0 and burst at least {BUF_BYTES} bytes")
        if not (0 < self.hello_timeout_s <= 60 and 0 < self.connect_timeout_s <= 60):
            raise ConfigError("relay timeouts must be in (0, 60] s")
        if min(self.max_connections, self.max_per_ip, self.max_waiting_per_node) < 1:
            raise ConfigError("relay connection limits must be >= 1")


class _Waiting:
    """A peer connection waiting for its node's dial-back."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.ready = threading.Event()
        self.node_sock: socket.socket | None = None


@dataclass(frozen=True, slots=True)
class HubEvent:
    """What a listening node is told: ``connect`` (dial back naming ``token``) or ``punch``
    (rendezvous naming ``token`` with ``peer``, swarm/transport/punch.py)."""

    kind: str
    token: bytes
    peer: str = ""


class _Punch:
    def __init__(self, dialer: str, acceptor: str, at_s: float) -> None:
        self.ids, self.at_s = (dialer, acceptor), at_s
        self.seen: list[tuple[str, int] | None] = [None, None]
        self.cond = threading.Condition()


class RelayHub:
    """Listeners (relayed node ids), peer connections waiting for a dial-back, hole-punching
    rendezvous, and byte counts. Thread-safe; shared by the relay port and the Relay servicer of
    one process."""

    def __init__(self, limits: RelayLimits | None = None, *, clock: Clock | None = None) -> None:
        self.limits = limits or RelayLimits()
        self.bucket = TokenBucket(self.limits.rate_Bps, self.limits.burst_bytes, clock or SystemClock())
        self._lock = threading.Lock()
        self._listeners: dict[str, queue.Queue] = {}
        self._waiting: dict[bytes, _Waiting] = {}
        self._punches: dict[bytes, _Punch] = {}
        self._clock = clock or SystemClock()
        self._bytes: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # node id -> [to node, from node]

    def listen(self, node_id: str) -> queue.Queue:
        """Register ``node_id``'s Listen stream (replacing an older one, whose queue gets None):
        the returned queue yields :class:`HubEvent`, or None when replaced."""
        q: queue.Queue = queue.Queue(maxsize=self.limits.max_waiting_per_node)
        with self._lock:
            old = self._listeners.get(node_id)
            self._listeners[node_id] = q
        while old is not None and not _put_nowait(old, None):  # full: its pending ids die with it
            try:
                old.get_nowait()
            except queue.Empty:
                pass
        return q

    def unlisten(self, node_id: str, q: queue.Queue) -> None:
        with self._lock:
            if self._listeners.get(node_id) is q:
                del self._listeners[node_id]

    def listening(self) -> list[str]:
        with self._lock:
            return sorted(self._listeners)

    def offer(self, node_id: str) -> tuple[bytes, _Waiting] | None:
        """A new peer connection for ``node_id``: its one-time id, or None when the node does not
        listen here or has too many connections waiting."""
        with self._lock:
            q = self._listeners.get(node_id)
            if q is None:
                return None
            cid = secrets.token_bytes(CONNECTION_ID_BYTES)
            waiting = _Waiting(node_id)
            self._waiting[cid] = waiting
        if not _put_nowait(q, HubEvent("connect", cid)):
            self.withdraw(cid)
            return None
        return cid, waiting

    def punch_offer(self, dialer: str, acceptor: str) -> bytes | None:
        """A hole-punching rendezvous between two nodes: its one-time id (sent to ``acceptor`` on
        its Listen stream), or None when the acceptor does not listen here or is busy."""
        now = self._clock.monotonic()
        with self._lock:
            for pid in [k for k, p in self._punches.items() if now - p.at_s > 60]:
                del self._punches[pid]  # nobody came
            q = self._listeners.get(acceptor)
            if q is None or dialer == acceptor or len(self._punches) >= self.limits.max_connections:
                return None
            pid = secrets.token_bytes(CONNECTION_ID_BYTES)
            self._punches[pid] = _Punch(dialer, acceptor, now)
        if not _put_nowait(q, HubEvent("punch", pid, dialer)):
            with self._lock:
                self._punches.pop(pid, None)
            return None
        return pid

    def punch_meet(self, pid: bytes, role: int, endpoint: tuple[str, int], timeout_s: float) -> tuple[str, int] | None:
        """One side of rendezvous ``pid`` arrived from ``endpoint`` (as the relay sees it): the
        other side's endpoint once it arrives too (within ``timeout_s``), else None. Each role
        comes once."""
        with self._lock:
            p = self._punches.get(pid)
        if p is None or role not in (0, 1):
            return None
        with p.cond:
            if p.seen[role] is not None:
                return None
            p.seen[role] = endpoint
            p.cond.notify_all()
            p.cond.wait_for(lambda: p.seen[1 - role] is not None, timeout_s)
            other = p.seen[1 - role]
            if other is not None:
                with self._lock:
                    self._punches.pop(pid, None)
        return other

    def withdraw(self, cid: bytes) -> None:
        with self._lock:
            self._waiting.pop(cid, None)

    def claim(self, cid: bytes, sock: socket.socket) -> bool:
        """A dial-back naming ``cid``: hand ``sock`` to the waiting peer connection (once)."""
        with self._lock:
            waiting = self._waiting.pop(cid, None)
        if waiting is None:
            return False
        waiting.node_sock = sock
        waiting.ready.set()
        return True

    def count(self, node_id: str, *, to_node: int = 0, from_node: int = 0) -> None:
        with self._lock:
            c = self._bytes[node_id]
            c[0] += to_node
            c[1] += from_node

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes relayed per node id since the start: ``{"to_node": n, "from_node": n}``."""
        with self._lock:
            return {k: {"to_node": v[0], "from_node": v[1]} for k, v in self._bytes.items()}


def _put_nowait(q: queue.Queue, item) -> bool:
    try:
        q.put_nowait(item)
        return True
    except queue.Full:
        return False


def node_id_from_server_name(name: str | None) -> str | None:
    """``<id>.node.swarm`` -> id; anything else -> None."""
    suffix = "." + NODE_DNS
    if not name or not name.endswith(suffix):
        return None
    node_id = name[:-len(suffix)]
    return node_id if is_node_id(node_id) else None


class RelayServer:
    """The relay port: a raw TCP listener serving :class:`RelayHub` (see the module docstring).
    ``start()`` binds and returns the port (0 picks one); ``stop()`` closes everything."""

    def __init__(self, hub: RelayHub, host: str = "0.0.0.0", port: int = 0) -> None:
        self.hub, self.host, self.port = hub, host, port
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._per_ip: dict[str, int] = defaultdict(int)
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for relaying on {self.host}:{self.port} ({exc}); "
                              "pick another --relay-port") from exc
        sock.listen(128)
        self._sock, self.port = sock, sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            try:  # close() alone does not wake a thread blocked in accept() (Linux): shutdown does
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            socks = list(self._open)
        for s in socks:
            close_quietly(s)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            ip = addr[0]
            with self._lock:
                full = len(self._open) >= self.hub.limits.max_connections or \
                    self._per_ip[ip] >= self.hub.limits.max_per_ip
                if not full:
                    self._open.add(conn)
                    self._per_ip[ip] += 1
            if full:
                log.warning("relay refused a connection from %s: connection limit reached", ip)
                close_quietly(conn)
                continue
            threading.Thread(target=self._serve, args=(conn, ip), name="relay-conn", daemon=True).start()

    def _release(self, conn: socket.socket, ip: str) -> None:
        with self._lock:
            if conn in self._open:
                self._open.discard(conn)
                self._per_ip[ip] -= 1
                if self._per_ip[ip] <= 0:
                    del self._per_ip[ip]
        close_quietly(conn)

    def _serve(self, conn: socket.socket, ip: str) -> None:
        handed_over = False
        try:
            head, node_id, cid = _read_head(conn, self.hub.limits.hello_timeout_s)
            if head.startswith(PUNCH_MAGIC):  # a hole-punching rendezvous: say where the other side is
                peer_ip, peer_port = conn.getpeername()[:2]
                other = self.hub.punch_meet(cid, head[-1], (peer_ip, peer_port), self.hub.limits.connect_timeout_s)
                if other is not None:
                    conn.sendall(f"{other[0]} {other[1]}\n".encode())
                return
            if cid is not None:  # a relayed node dialling back: the waiting peer thread splices it
                handed_over = self.hub.claim(cid, conn)
                if not handed_over:
                    log.info("relay: dial-back from %s names no waiting connection", ip)
                return
            if node_id is None:
                return
            offered = self.hub.offer(node_id)
            if offered is None:
                log.info("relay: %s asked for node %s, which does not listen here", ip, node_id[:8])
                return
            cid, waiting = offered
            if not waiting.ready.wait(self.hub.limits.connect_timeout_s):
                self.hub.withdraw(cid)
                if waiting.node_sock is not None:  # it came just as we gave up
                    close_quietly(waiting.node_sock)
                log.warning("relay: node %s did not dial back within %.1f s", node_id[:8],
                            self.hub.limits.connect_timeout_s)
                return
            node_sock = waiting.node_sock
            try:
                node_sock.sendall(head)
                self.hub.count(node_id, to_node=len(head))
                splice(conn, node_sock, bucket=self.hub.bucket,
                       on_a_to_b=lambda n: self.hub.count(node_id, to_node=n),
                       on_b_to_a=lambda n: self.hub.count(node_id, from_node=n))
            finally:
                close_quietly(node_sock)
        except (OSError, NotClientHello) as exc:
            log.debug("relay connection from %s closed: %s", ip, exc)
        finally:
            if handed_over:  # the peer's thread owns it now; it closes it, we only stop counting
                with self._lock:
                    self._open.discard(conn)
                    self._per_ip[ip] -= 1
                    if self._per_ip[ip] <= 0:
                        del self._per_ip[ip]
            else:
                self._release(conn, ip)


def _read_head(conn: socket.socket, timeout_s: float) -> tuple[bytes, str | None, bytes | None]:
    """(bytes read, node id asked for, dial-back connection id): the first TLS record or the
    dial-back preamble, within ``timeout_s`` overall. Raises NotClientHello / OSError."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        if data[:1] == MAGIC[:1]:
            want = PUNCH_PREAMBLE_BYTES if data[:len(PUNCH_MAGIC)] == PUNCH_MAGIC[:len(data)] else PREAMBLE_BYTES
            if len(data) >= want:
                if data[:len(PUNCH_MAGIC)] == PUNCH_MAGIC and len(data) == PUNCH_PREAMBLE_BYTES:
                    return data, None, data[len(PUNCH_MAGIC):-1]
                if data[:len(MAGIC)] != MAGIC or len(data) != PREAMBLE_BYTES:
                    raise NotClientHello("bad dial-back preamble")
                return data, None, data[len(MAGIC):]
        elif data:
            try:
                return data, node_id_from_server_name(parse_sni(data)), None
            except NeedMoreData:
                pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotClientHello(f"no ClientHello within {timeout_s:g} s")
        conn.settimeout(left)
        want = PUNCH_PREAMBLE_BYTES - len(data) if data[:1] == MAGIC[:1] else MAX_HELLO_BYTES - len(data)
        chunk = conn.recv(max(1, want))
        if not chunk:
            raise NotClientHello("closed before a ClientHello")
        data += chunk
        if len(data) > MAX_HELLO_BYTES:
            raise NotClientHello("ClientHello too large")


def dial_back(relay_address: tuple[str, int], cid: bytes, local_address: tuple[str, int], *,
              timeout_s: float = 5.0) -> None:
    """The relayed node's side of one connection: connect to the relay, name ``cid``, and splice
    with the local peer server until both ends close. Raises OSError if either cannot be reached."""
    if len(cid) != CONNECTION_ID_BYTES:
        raise ValueError("a relay connection id is 16 bytes")
    relay = socket.create_connection(relay_address, timeout=timeout_s)
    try:
        relay.sendall(MAGIC + cid)
        local = socket.create_connection(local_address, timeout=timeout_s)
    except OSError:
        close_quietly(relay)
        raise
    try:
        splice(relay, local)
    finally:
        close_quietly(relay)
        close_quietly(local)
