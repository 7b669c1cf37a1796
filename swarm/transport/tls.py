"""TLS on every gRPC channel of a swarm, and who is calling.

Protocol (what each participant does; certificates and names: swarm/certs.py):

- Trust: the only root is the coordinator's CA. A node or a user gets it from the join token:
  :func:`fetch_ca` does a TLS handshake with the coordinator's gRPC port WITHOUT trusting it,
  takes the certificate chain the server sends (server certificate + CA certificate) and keeps
  the CA certificate only if its SHA-256 equals the token's fingerprint; otherwise it refuses
  ("wrong token or someone in the middle"). Nothing is sent before that check.
- Servers: the coordinator's port serves TLS and does not ask clients for a certificate (users'
  CLIs have none; grpcio offers only "require" or "don't request"): nodes authenticate there
  with the session secret of their signed registration, users with the token, both only ever
  sent inside TLS. A node's peer port REQUIRES a client certificate from the swarm CA (nodes and
  the coordinator have one). Plaintext clients get a failed handshake on both.
- Names: clients verify the server's certificate against the CA and a fixed name, whatever
  address they dial: ``coordinator.swarm`` for the coordinator, ``<node id>.node.swarm`` for a
  node they know by id (``node.swarm`` for any node), so a node cannot answer in another's name.
- Caller identity: servers take it from the verified client certificate
  (:meth:`TlsSecurity.peer_identity`: a node id or ``"coordinator"``), never from metadata.
- Renewal: a node's certificate is short-lived and replaced while it heartbeats
  (:meth:`TlsSecurity.set_certificate`). Its peer server uses grpc's dynamic server credentials:
  the fetcher is called at every handshake and hands out the newest certificate; channels made
  afterwards use the new one too (:class:`~swarm.transport.lazy_channels.RenewingStub` rebuilds
  its channel when it changed).

:class:`PlaintextSecurity` is for ONE benchmark only (``bench/pipeline.py`` measuring the cost of
TLS): same interface, no encryption, caller identity asserted in metadata. No CLI flag reaches
it; the benchmark sets ``SWARM_BENCH_PLAINTEXT=1`` and the entry points read it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarm import certs
from swarm.errors import AuthError, ConfigError, UnavailableError
from swarm.transport.errors import http_port_error

log = logging.getLogger(__name__)

BENCH_PLAINTEXT_ENV = "SWARM_BENCH_PLAINTEXT"  # benchmark only: see PlaintextSecurity
_BENCH_IDENTITY_KEY = "swarm-bench-identity"
MISMATCH = "the coordinator's CA fingerprint does not match the token: wrong token or someone in the middle"


# ----------------------------------------------------------------------------- bootstrap
def _split(address: str) -> tuple[str, int]:
    from swarm.transport.channels import parse_address

    return parse_address(address)


class _NotTls(Exception):
    """The server did not complete a TLS handshake; ``first_bytes``: the start of what it sent."""

    def __init__(self, first_bytes: bytes, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.first_bytes = first_bytes
        self.cause = cause


def _server_chain(host: str, port: int, timeout_s: float) -> tuple[list[bytes], str | None]:
    """Handshake with ``host:port`` without trusting it: the certificate chain it sent (DER) and
    the ALPN protocol it chose. Raises _NotTls (no TLS there), OSError (unreachable).

    The handshake runs over memory BIOs so that what a server answers instead of TLS stays
    visible: an HTTP/1 server replies to the ClientHello with an HTTP error (aiohttp:
    ``HTTP/1.0 400 Bad Request``, "Received HTTPS traffic on an HTTP port"), which the ssl module
    alone reports only as WRONG_VERSION_NUMBER."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Not trusting the server is the point: the chain is checked against the pin by the caller.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=certs.COORDINATOR_DNS)
        first = b""
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                raise _NotTls(first, exc) from exc
            try:
                if pending := outgoing.read():
                    raw.sendall(pending)
                if done:
                    break
                chunk = raw.recv(1 << 16)
            except ConnectionResetError as exc:
                raise _NotTls(first, exc) from exc
            if not chunk:
                raise _NotTls(first, ConnectionResetError("the server closed the connection during the TLS handshake"))
            first = first or chunk[:16]
            incoming.write(chunk)
        # Public as get_unverified_chain() from Python 3.13; the same C method exists on the
        # internal object since 3.10 (we support >= 3.11).
        getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain
        chain = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in getter() or ()]
        return chain, tls.selected_alpn_protocol()


def fetch_ca(address: str, fingerprint: str, *, timeout_s: float = 10.0) -> bytes:
    """The coordinator's CA certificate (PEM), checked against the token's ``fingerprint``.

    Raises UnavailableError (unreachable: retry), WrongProtocolError (``address`` answers HTTP:
    the coordinator's --http-port was given), AuthError (no TLS there, or no certificate with that
    fingerprint: wrong token or an impostor)."""
    host, port = _split(address)
    try:
        chain, alpn = _server_chain(host, port, timeout_s)
    except _NotTls as exc:
        if exc.first_bytes.startswith(b"HTTP/"):  # plain HTTP/1 (the status page's port without --tls-cert)
            raise http_port_error(address) from exc.cause
        raise AuthError(f"the coordinator at {address} does not speak TLS as a swarm coordinator ({exc}); "
                        "check --coordinator (the gRPC port, not the HTTP one)") from exc.cause
    except OSError as exc:
        raise UnavailableError(f"coordinator at {address} is unreachable ({exc})") from exc
    for der in chain:
        if certs.der_fingerprint(der) == fingerprint:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    if alpn != "h2":
        # TLS but not gRPC (every gRPC server negotiates h2): an HTTPS server, such as the
        # coordinator's --http-port with --tls-cert. Named as such rather than as an impostor.
        raise http_port_error(address)
    raise AuthError(MISMATCH)


def pinned_ca(state_dir, address: str, fingerprint: str, *, timeout_s: float = 10.0) -> bytes:
    """The CA pinned in ``state_dir/coordinator_ca.pem`` if it matches ``fingerprint``, else
    fetched with :func:`fetch_ca` and stored there (0600)."""
    import os
    from pathlib import Path

    path = Path(state_dir) / "coordinator_ca.pem"
    if path.exists():
        pem = path.read_bytes()
        try:
            if certs.fingerprint(pem) == fingerprint:
                return pem
        except ValueError:
            pass
        log.warning("the pinned CA in %s is not the token's; fetching the coordinator's", path)
    pem = fetch_ca(address, fingerprint, timeout_s=timeout_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    return pem


# ----------------------------------------------------------------------------- security objects
class TlsSecurity:
    """This process's TLS material and the channels and ports made from it. Thread-safe.

    ``ca_pem``: the swarm CA (None until pinned: channels raise UnavailableError until then);
    ``key_pem`` / ``cert_pem``: this process's key and certificate (chain), None for a client
    without one (a user's CLI, a node's channel to the coordinator before registration)."""

    def __init__(self, *, ca_pem: bytes | None = None, key_pem: bytes | None = None,
                 cert_pem: bytes | None = None) -> None:
        self._lock = threading.Lock()
        self._ca = ca_pem
        self._key = key_pem
        self._cert = cert_pem
        self.generation = 0
        self._placeholder: tuple[bytes, bytes] | None = None
        # where this process's channels to a node really go: (address, node id) -> address; set
        # by a relayed node to its hole-punching bridge (swarm/transport/punch.py), else None
        self.route: Callable[[str, str], str] | None = None
        self._ssl_cache: dict[bool, tuple[int, ssl.SSLContext]] = {}  # server? -> (generation, context)

    # -- material ---------------------------------------------------------------------------------
    @property
    def ca_pem(self) -> bytes | None:
        with self._lock:
            return self._ca

    @property
    def cert_pem(self) -> bytes | None:
        with self._lock:
            return self._cert

    def set_ca(self, ca_pem: bytes) -> None:
        with self._lock:
            self._ca = ca_pem
            self.generation += 1

    def set_certificate(self, cert_pem: bytes, key_pem: bytes | None = None) -> None:
        """Use a new (renewed) certificate from now on: new handshakes and new channels."""
        with self._lock:
            self._cert = cert_pem
            if key_pem is not None:
                self._key = key_pem
            self.generation += 1

    def _material(self) -> tuple[bytes | None, bytes | None, bytes | None, int]:
        with self._lock:
            return self._ca, self._key, self._cert, self.generation

    # -- servers ----------------------------------------------------------------------------------
    def add_port(self, server: grpc.Server, target: str, *, require_client_auth: bool) -> int:
        """Listen with TLS on ``target``; 0 when it cannot bind (like add_insecure_port)."""
        return server.add_secure_port(target, self._server_credentials(require_client_auth))

    def _config(self):
        ca, key, cert, gen = self._material()
        if key is None or cert is None:
            if self._placeholder is None:
                import time

                k = certs.new_key()
                self._placeholder = (certs.key_pem(k), certs.cert_pem(certs.self_signed_placeholder(k, now_s=time.time())))
            key, cert = self._placeholder
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), gen

    def _server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        initial, served = self._config()
        state = {"generation": served}

        def fetch():  # called by grpc at every handshake: None keeps the current configuration
            if self.generation == state["generation"]:
                return None
            config, gen = self._config()
            state["generation"] = gen
            return config

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=require_client_auth)

    # -- clients ----------------------------------------------------------------------------------
    def channel(self, address: str, *, server_name: str, options: list) -> grpc.Channel:
        """A TLS channel to ``address`` that accepts only a CA-signed certificate naming ``server_name``."""
        ca, key, cert, _ = self._material()
        if ca is None:
            raise UnavailableError("the coordinator's CA is not pinned yet (not connected once); retry shortly")
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key if cert else None,
                                             certificate_chain=cert if key else None)
        return grpc.secure_channel(address, creds, options=[*options, ("grpc.ssl_target_name_override", server_name)])

    # -- plain sockets (the inference step wire, swarm/transport/step_wire.py) ---------------------
    def ssl_context(self, *, server: bool) -> ssl.SSLContext:
        """An ``ssl`` context with this process's certificate that trusts only the swarm CA: a
        server's requires the peer's certificate; a client's checks the server's name (pass
        ``server_hostname``). Made anew when the material changed (a renewed certificate)."""
        ca, key, cert, gen = self._material()
        if ca is None or key is None or cert is None:
            raise UnavailableError("no certificate yet (not registered with the coordinator); retry shortly")
        cache = self._ssl_cache
        got = cache.get(server)
        if got is not None and got[0] == gen:
            return got[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=ca.decode())
        _load_chain(ctx, key, cert)
        cache[server] = (gen, ctx)
        return ctx

    # -- who is calling ---------------------------------------------------------------------------
    @staticmethod
    def peer_identity(context) -> str:
        """The caller's node id, or ``"coordinator"``, from its verified client certificate.
        Raises AuthError when the call came without one (the coordinator's port does not ask)."""
        ctx = context.auth_context() or {}
        who = certs.identity_from_uris(ctx.get("peer_uri", ()))
        if who is None:
            raise AuthError("this call needs a swarm certificate (a node's or the coordinator's) and came without one")
        return who


def _load_chain(ctx: ssl.SSLContext, key_pem: bytes, cert_pem: bytes) -> None:
    """``load_cert_chain`` reads files only: a private temporary file, removed at once."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="swarm-tls-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem if key_pem.endswith(b"\n") else key_pem + b"\n")
            f.write(cert_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class PlaintextSecurity:
    """BENCHMARK ONLY (``SWARM_BENCH_PLAINTEXT=1``): no TLS, so its cost can be measured. The
    caller's identity is asserted in metadata, so authorization runs the same code as with TLS."""

    generation = 0
    route = None  # no hole punching in the plaintext benchmark mode

    def __init__(self, identity: str) -> None:
        self.identity = identity
        log.warning("PLAINTEXT gRPC (%s=1): benchmark only, nothing is encrypted or authenticated", BENCH_PLAINTEXT_ENV)

    ca_pem = cert_pem = None

    def set_ca(self, ca_pem: bytes) -> None:
        pass

    def set_certificate(self, cert_pem: bytes, key_pem: bytes | None = None) -> None:
        pass

    def add_port(self, server: grpc.Server, target: str, *, require_client_auth: bool) -> int:
        return server.add_insecure_port(target)

    def channel(self, address: str, *, server_name: str, options: list) -> grpc.Channel:
        return grpc.intercept_channel(grpc.insecure_channel(address, options=options),
                                      _IdentityInterceptor(self.identity))

    @staticmethod
    def peer_identity(context) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == _BENCH_IDENTITY_KEY and isinstance(value, str):
                return value
        raise AuthError("plaintext benchmark call without an identity")


class _IdentityInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, identity: str) -> None:
        self._md = (_BENCH_IDENTITY_KEY, identity)

    def _details(self, d):
        md = [*(d.metadata or ()), self._md]
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


Security = TlsSecurity | PlaintextSecurity


def bench_plaintext(env) -> bool:
    """Whether the benchmark-only plaintext mode is on (read by the entry points only)."""
    return env.get(BENCH_PLAINTEXT_ENV, "") == "1"


def check_fingerprint_text(fp: str) -> str:
    fp = (fp or "").strip().lower()
    if len(fp) != certs.FINGERPRINT_HEX_CHARS or any(c not in "0123456789abcdef" for c in fp):
        raise ConfigError("a CA fingerprint is 64 hex characters (the part of the token after 'swarm1.')")
    return fp
