"""The step wire: inference steps over one TLS socket per chain link, without gRPC on the hot path.

Why: a decode step is a few KiB each way per hop, and what a hop costs is latency. Through a
gRPC stream a message crosses three threads on each side (the caller's, gRPC's request
generator / poller, the server's handler pool); measured between two processes on a 2-core box,
mutual TLS both: a gRPC bidi-stream round trip of 2 KiB took 128 us (p50), the same bytes over a
TLS socket whose one thread reads, runs and writes took 17 us. Here each link is such a socket.

Protocol (a node's side is :class:`WireServer`, a caller's :class:`WireConnection`):

- A node listens on a TCP port of its own (its peer host, ``--step-wire-port``, a free port by
  default) with TLS, and requires a certificate of the swarm CA, as its gRPC port does. A caller
  learns the port from the node's gRPC ``StepWire`` call, connects, checks that the server's
  certificate names the node it meant (``<node id>.node.swarm``, as gRPC data channels do) and
  presents its own, from which the node reads who is calling (``swarm://node/<id>`` or
  ``swarm://coordinator``).
- Frames: a 5-byte header (uint32 little-endian body length, one byte kind), then the body, at
  most :data:`MAX_FRAME_BYTES`. Kinds: ``HELLO`` (first frame from the caller: JSON
  ``{"metadata": [[key, value], ...]}``, what gRPC sends as call metadata: the chain's step
  capability), ``STEP`` (a ``ServeStepRequest``), ``REPLY`` (a ``ServeStepReply``, answering the
  STEP before it), ``READY`` (empty: the node's answer to a HELLO it accepted; only then does the
  caller send steps), ``ERROR`` (JSON ``{"code": "<gRPC status name>", "message": ...}``, with
  ``"refused": true`` when it answers the HELLO; the node closes the connection after it).
- The node serves a connection on one thread: it reads a STEP, runs it through exactly the code
  of a gRPC ``StepStream`` (same checks of caller, chain and capability; the servicer cannot tell
  the transports apart) and writes the REPLY. One step in flight per connection.
- Failures: a malformed frame, a frame over the limit or a HELLO that is not one gets ``ERROR
  INVALID_ARGUMENT``; a handshake or HELLO not done within :data:`HANDSHAKE_S`, or a connection
  idle for :data:`IDLE_S`, is closed; at most :data:`MAX_CONNECTIONS` at once
  (:data:`MAX_PER_CALLER` per certificate: one over gets ``ERROR RESOURCE_EXHAUSTED`` for its
  HELLO, and its caller uses gRPC), more are closed at once. A caller whose step is not
  answered within its timeout closes the connection and fails the step (``PeerError``); the next
  step connects again. A caller that cannot connect (the port not reachable: NAT, a firewall)
  uses the gRPC stream instead (swarm/transport/step_link.py).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from swarm.certs import identity_from_uris, node_dns
from swarm.errors import InvalidRequestError, PeerError
from swarm.proto.v1 import inference_pb2 as pb
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES
from swarm.transport.errors import error_from_rpc
from swarm.transport.spin import ENDPOINTS, wait_readable

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IB")
HELLO, STEP, REPLY, ERROR, READY = 1, 2, 3, 4, 5
MAX_FRAME_BYTES = DATA_MAX_MESSAGE_BYTES
MAX_HELLO_BYTES = 16 << 10
HANDSHAKE_S = 10.0
IDLE_S = 300.0
CONNECT_S = 3.0
MAX_CONNECTIONS = 64
MAX_PER_CALLER = 32
READ_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------- frames
def _read_exact(sock, n: int) -> bytes | None:
    """``n`` bytes, or None when the peer closed before the first byte; raises on a short read.
    The buffer starts at :data:`READ_CHUNK` and doubles as the bytes arrive: a header claiming a
    large frame reserves no memory the peer does not fill."""
    buf = bytearray(min(n, READ_CHUNK))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n - got, len(buf))))
        with memoryview(buf) as view:  # released before the next extend
            k = sock.recv_into(view[got:], len(buf) - got)
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed in the middle of a frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def read_frame(sock, *, max_bytes: int = MAX_FRAME_BYTES) -> tuple[int, bytes] | None:
    """The next (kind, body), or None at a clean end of the connection."""
    head = _read_exact(sock, HEADER.size)
    if head is None:
        return None
    size, kind = HEADER.unpack(head)
    if kind not in (HELLO, STEP, REPLY, ERROR, READY):
        raise InvalidRequestError(f"unknown step-wire frame kind {kind}")
    if size > max_bytes:
        raise InvalidRequestError(f"step-wire frame of {size} bytes is over the limit of {max_bytes}")
    body = _read_exact(sock, size) if size else b""
    if body is None:
        raise ConnectionError("connection closed after a frame header")
    return kind, body


def write_frame(sock, kind: int, body: bytes) -> None:
    sock.sendall(HEADER.pack(len(body), kind) + body)


def _json_frame(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------------- server
class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _WireContext:
    """What the servicer's StepStream reads of a gRPC context, for a wire connection."""

    def __init__(self, peer_uris: list[str], metadata: tuple[tuple[str, str], ...]) -> None:
        self._auth = {"peer_uri": [u.encode() for u in peer_uris]}
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None

    def auth_context(self) -> dict:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def abort(self, code: grpc.StatusCode, message: str):
        self._code = code
        raise _Aborted(code, message)


def _parse_hello(body: bytes) -> tuple[tuple[str, str], ...]:
    try:
        obj = json.loads(body.decode())
        pairs = obj["metadata"]
        if not isinstance(pairs, list) or len(pairs) > 16:
            raise ValueError("metadata must be a list of at most 16 pairs")
        out = []
        for p in pairs:
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and len(x) <= 4096 for x in p)):
                raise ValueError("each metadata pair is [key, value], strings")
            out.append((p[0], p[1]))
        return tuple(out)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequestError(f"malformed step-wire HELLO ({exc}); send {{\"metadata\": [[key, value], ...]}}") \
            from exc


def peer_uris(tls_sock: ssl.SSLSocket) -> list[str]:
    cert = tls_sock.getpeercert() or {}
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


class WireServer:
    """Accepts step-wire connections and serves each on its own thread with ``serve_stream``
    (the servicer's ``StepStream(request_iterator, context)``)."""

    def __init__(self, *, security, host: str, port: int,
                 serve_stream: Callable[[Iterator[pb.ServeStepRequest], object], Iterator[pb.ServeStepReply]],
                 spin_s: float = 0.0) -> None:
        """``spin_s``: how long a connection's thread busy-polls for the next step before blocking
        (:func:`wait_readable`)."""
        self._spin_s = spin_s
        self._security = security
        self._serve_stream = serve_stream
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        # open connections -> their caller (None until the handshake named it); the TLS socket
        # replaces the raw one once wrapped (wrapping detaches the raw socket: closing it does nothing)
        self._conns: dict[socket.socket, str | None] = {}
        self._stopped = False
        self.steps = 0  # steps answered over the wire (a node metric)
        self._thread = threading.Thread(target=self._accept_loop, name="step-wire-accept", daemon=True)

    def start(self) -> "WireServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # shut down first: a close alone does not wake a thread blocked reading
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            _close(c)

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                if self._stopped:
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns[raw] = None
            if full:
                _close(raw)
                continue
            threading.Thread(target=self._serve, args=(raw,), name="step-wire-conn", daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        tls = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_S)
            tls = self._security.ssl_context(server=True).wrap_socket(raw, server_side=True)
            uris = peer_uris(tls)
            caller = identity_from_uris(uris)
            if caller is None:
                return  # a CA-signed certificate that names no node nor the coordinator
            with self._lock:
                self._conns.pop(raw, None)
                full = sum(1 for c in self._conns.values() if c == caller) >= MAX_PER_CALLER
                if not full:
                    self._conns[tls] = caller
            if full:  # the answer to its HELLO: the caller uses gRPC instead
                log.info("step wire: refused a connection from %s (already %d open)", caller[:12], MAX_PER_CALLER)
                _send_error(tls, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"this node already serves {MAX_PER_CALLER} step-wire connections of yours; use gRPC",
                            refused=True)
                return
            self._serve_tls(tls, uris)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.debug("step wire connection ended: %s", exc)
        except Exception:  # noqa: BLE001 -- a connection's bug must not kill the server
            log.exception("step wire connection failed")
        finally:
            with self._lock:
                self._conns.pop(raw, None)
                if tls is not None:
                    self._conns.pop(tls, None)
            _close(tls if tls is not None else raw)

    def _serve_tls(self, tls: ssl.SSLSocket, uris: list[str]) -> None:
        try:
            first = read_frame(tls, max_bytes=MAX_HELLO_BYTES)
            if first is None:
                return
            if first[0] != HELLO:
                raise InvalidRequestError("a step-wire connection starts with a HELLO frame")
            metadata = _parse_hello(first[1])
        except InvalidRequestError as exc:
            _send_error(tls, grpc.StatusCode.INVALID_ARGUMENT, str(exc), refused=True)
            return
        write_frame(tls, READY, b"")
        tls.settimeout(IDLE_S)
        context = _WireContext(uris, metadata)
        ENDPOINTS.add(1)
        try:
            self._serve_steps(tls, context)
        finally:
            ENDPOINTS.add(-1)

    def _serve_steps(self, tls: ssl.SSLSocket, context: "_WireContext") -> None:
        def requests() -> Iterator[pb.ServeStepRequest]:
            while True:
                try:
                    wait_readable(tls, self._spin_s)
                    frame = read_frame(tls)
                except (OSError, ConnectionError):  # the caller went away, or idle past IDLE_S: the end
                    return
                if frame is None:
                    return
                kind, body = frame
                if kind != STEP:
                    raise InvalidRequestError(f"expected a STEP frame, got kind {kind}")
                try:
                    yield pb.ServeStepRequest.FromString(body)
                except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError and friends
                    raise InvalidRequestError(f"malformed ServeStepRequest: {exc}") from exc

        stream = self._serve_stream(requests(), context)
        try:
            for reply in stream:
                write_frame(tls, REPLY, reply.SerializeToString())
                self.steps += 1
        except _Aborted as exc:
            _send_error(tls, exc.code, exc.message)
        finally:
            stream.close()  # its link to the next stage closes now, not when collected


def _send_error(sock, code: grpc.StatusCode, message: str, *, refused: bool = False) -> None:
    """``refused``: the connection is turned away before any step was read (the caller may send
    its step another way)."""
    body = {"code": code.name, "message": message[:4000]}
    if refused:
        body["refused"] = True
    try:
        write_frame(sock, ERROR, _json_frame(body))
    except OSError:
        pass


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


# ----------------------------------------------------------------------------------- caller
class _Status(grpc.RpcError):
    """An ERROR frame, shaped as the RpcError that error_from_rpc maps (one mapping of codes)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class WireRefused(PeerError):
    """The node turned the connection away before reading the step: send it over gRPC."""


def _status_from(body: bytes) -> tuple[_Status, bool]:
    """The error frame's status, and whether it refused the connection before any step."""
    try:
        obj = json.loads(body.decode())
        code = grpc.StatusCode[str(obj["code"])]
        return _Status(code, str(obj.get("message", ""))[:4000]), obj.get("refused") is True
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return _Status(grpc.StatusCode.UNKNOWN, "malformed error frame"), False


@dataclass(frozen=True, slots=True)
class WireTarget:
    """Where a link's steps may go over the wire: the node's gRPC ``address`` (its host is the
    wire's), its id (its certificate must name it), this process's ``security``, and
    ``ask()``: the node's ``StepWire`` answer (its wire port, 0: it has none; whether it reads
    raw hidden states)."""

    address: str
    node_id: str
    security: object
    ask: Callable[[], pb.ServeStepWireReply]
    spin_s: float = 0.0  # the connection busy-polls for each reply this long before blocking (wait_readable)


class WireConnection:
    """One connected step wire to a node; one step in flight; not shared between threads."""

    def __init__(self, target: WireTarget, port: int, *, metadata, what: str) -> None:
        self.what = what
        self._spin_s = target.spin_s
        host = target.address.rpartition(":")[0].strip("[]")
        raw = socket.create_connection((host, port), timeout=CONNECT_S)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = target.security.ssl_context(server=False).wrap_socket(
                raw, server_hostname=node_dns(target.node_id))
            write_frame(self._sock, HELLO, _json_frame({"metadata": [list(kv) for kv in metadata]}))
            frame = read_frame(self._sock, max_bytes=MAX_HELLO_BYTES)
        except BaseException:
            _close(raw)
            raise
        if frame is None or frame[0] != READY:
            self.close()
            if frame is not None and frame[0] == ERROR:
                status, _ = _status_from(frame[1])
                raise WireRefused(f"{what} refused the step-wire connection: {status.details()}")
            raise PeerError(f"{what} did not accept the step-wire connection")
        ENDPOINTS.add(1)
        self._counted = True

    def step(self, request: pb.ServeStepRequest, *, timeout_s: float) -> pb.ServeStepReply:
        """Send one step, wait for its reply. Raises the stage's error (then the connection is
        closed: the caller makes a new one) or PeerError when the wire broke or timed out."""
        try:
            self._sock.settimeout(timeout_s)
            write_frame(self._sock, STEP, request.SerializeToString())
            wait_readable(self._sock, self._spin_s)
            frame = read_frame(self._sock)
        except socket.timeout as exc:
            self.close()
            raise PeerError(f"{self.what} did not answer a step within {timeout_s:g} s") from exc
        except (OSError, ConnectionError, InvalidRequestError) as exc:
            self.close()
            raise PeerError(f"{self.what}: step wire broke ({exc}); the next step reconnects") from exc
        if frame is None:
            self.close()
            raise PeerError(f"{self.what} closed its step wire without answering")
        kind, body = frame
        if kind == REPLY:
            try:
                return pb.ServeStepReply.FromString(body)
            except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError
                self.close()
                raise PeerError(f"{self.what} sent a malformed step reply ({exc})") from exc
        self.close()
        if kind == ERROR:
            raise error_from_rpc(_status_from(body)[0], self.what)
        raise PeerError(f"{self.what} sent step-wire frame kind {kind} where a reply was due")

    def close(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        if getattr(self, "_counted", False):
            self._counted = False
            ENDPOINTS.add(-1)
        if sock is not None:
            _close(sock)

    @property
    def closed(self) -> bool:
        return self._sock is None


def wire_target(security, address: str, node_id: str, stub, *, spin_s: float = 0.0) -> WireTarget | None:
    """The step wire of the node at ``address`` for a link from this process (``stub``: an
    ``InferenceStageStub`` to it), or None where only gRPC can go: benchmark plaintext, or a
    node reached through a relay or a punched hole (``security.route`` sends it elsewhere)."""
    if not hasattr(security, "ssl_context"):
        return None
    route = getattr(security, "route", None)
    if route is not None and route(address, node_id) != address:
        return None
    return WireTarget(address=address, node_id=node_id, security=security,
                      ask=lambda: stub.StepWire(pb.ServeStepWireRequest(), timeout=5), spin_s=spin_s)
