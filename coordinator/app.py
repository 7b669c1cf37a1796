"""The coordinator as one object: state dir, clock, SQLite, registry, network, servers, plugins.

Extension seams: plugins never get this object. Each plugin module listed in
:mod:`coordinator.plugins` has a factory ``create(host)``; the app builds one
:class:`coordinator.plugins.CoordinatorHost` (clock, state_dir, db, registry, network,
authenticate_node, authenticate_user, services) and calls each factory once at ``start()``. The
returned :class:`coordinator.plugins.CoordinatorPlugin` objects get ``install_grpc(server)`` and
``install_http(web_app)`` before the servers start, ``start()`` once both serve, and ``stop()``
(reverse order) before they stop. Plugins reach each other's services only through the typed
registry ``host.services`` (:mod:`coordinator.services`: ``services.jobs``,
``services.inference``), which tests reach as ``app.services``.
"""

from __future__ import annotations

import math

import hmac
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from swarm import certs
from swarm.clock import Clock, SystemClock
from swarm.errors import AuthError, ConfigError
from swarm.identity import is_node_id
from swarm.plugins import stop_plugins
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.transport.auth import MAX_SESSION_CHARS, read_api_token, read_credentials
from swarm.transport.channels import CONTROL_MAX_MESSAGE_BYTES, bind, make_server
from swarm.transport.limits import StreamLimits
from swarm.transport.relay import RelayLimits

from coordinator import credentials
from coordinator.admission import Admission, AdmissionPolicy, local_hosts
from swarm.transport.tls import PlaintextSecurity, TlsSecurity

from coordinator import plugins as plugin_registry
from coordinator.ca import CoordinatorCA
from coordinator.http import HttpServer, build_web_app
from coordinator.plugins import CoordinatorHost, CoordinatorPlugin
from coordinator.network import MeasurementPolicy, MeasurementScheduler, NetworkStore, ProbeBook
from coordinator.reachability import Reachability
from coordinator.registry import NodeRegistry
from coordinator.servicer import MAX_CLOCK_SKEW_S, CoordinatorServicer
from coordinator.services import Services
from coordinator.store import Database
from coordinator.verification import Challenges

log = logging.getLogger(__name__)

TOKEN_FILE = credentials.JOIN_SECRET_FILE  # the join token's secret part (kept as before)
FULL_TOKEN_FILE = credentials.TOKEN_FILES[credentials.JOIN]  # what nodes paste: swarm1.<CA fingerprint>.<secret>


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    http_host: str | None = None  # None: same as host
    http_port: int = 0
    join_token: str | None = None  # None: the stored one (SQLite meta / state_dir/join_token) or a new one
    admin_token: str | None = None  # likewise (secret or this CA's full token); see coordinator/credentials.py
    read_token: str | None = None
    public_status: bool = False  # /api, /metrics, the page and gRPC reads without a credential (no addresses)
    api_keys: tuple[str, ...] = ()  # /v1 takes these (and those of api_keys_file) instead of tokens when set
    api_keys_file: Path | None = None
    heartbeat_interval_s: float = 2.0
    node_timeout_s: float = 6.0
    # After a (re)start, nodes restored from SQLite have this long to re-register (their sessions
    # died with the old process) before any is declared lost; None: 3 x node_timeout_s.
    restart_grace_s: float | None = None
    sweep_interval_s: float = 0.5
    measurement: MeasurementPolicy = field(default_factory=MeasurementPolicy)
    plugins: tuple[str, ...] = plugin_registry.PLUGINS
    max_workers: int = 64
    max_nodes: int = 10_000  # registrations beyond are refused (RESOURCE_EXHAUSTED)
    # Nodes behind one NAT share an address: more streams per remote IP than a node allows.
    stream_limits: StreamLimits = field(default_factory=lambda: StreamLimits(max_streams_per_peer=16))
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)  # per-token limits, lost-node TTL
    flush_interval_s: float = 5.0  # heartbeats are written to SQLite this often (kept in memory between)
    max_model_params: int = 2_000_000_000  # a job's model (config-only uploads included) may not be larger
    # CPU FLOP/s per model the referee may spend replaying check windows of one-chain models
    # (--referee-gflops; swarm/inference/referee.py); 0: no referee (such windows stay void)
    referee_flops_per_s: float = 20e9
    rebalance: bool = True  # re-balance a job's layers around a node seen slow (--no-rebalance: only report it)
    helpers: bool = True  # add idle nodes as helpers of a running job's slowest stage (--no-helpers: never)
    tls_sans: tuple[str, ...] = ()  # more names/IPs for the coordinator's certificate (--tls-san)
    node_cert_lifetime_s: float = 86400.0  # nodes' certificates; renewed past half of it
    http_tls_cert: Path | None = None  # HTTPS on the HTTP port with a real certificate (--tls-cert/--tls-key)
    http_tls_key: Path | None = None
    bench_plaintext: bool = False  # BENCHMARK ONLY (SWARM_BENCH_PLAINTEXT=1): no TLS on gRPC
    relay_port: int | None = 0  # the relay port for nodes behind NAT (coordinator/reachability.py); None: off
    relay_limits: RelayLimits = field(default_factory=RelayLimits)  # its bandwidth cap and connection limits

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.relay_port is not None and not 0 <= self.relay_port <= 65535:
            raise ConfigError("--relay-port must be in 0..65535 (0 picks one, -1 turns relaying off)")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be in 0..65535")
        if not 0 < self.heartbeat_interval_s < self.node_timeout_s:
            raise ConfigError("need 0 < --heartbeat-interval-s < --node-timeout-s")
        if self.restart_grace_s is not None and not 0 <= self.restart_grace_s <= 3600:
            raise ConfigError("--restart-grace-s must be in 0..3600")
        if self.sweep_interval_s <= 0:
            raise ConfigError("--sweep-interval-s must be > 0")
        for name, flag in (("join_token", "--token"), ("admin_token", "--admin-token"), ("read_token", "--read-token")):
            value = getattr(self, name)
            if value is not None and not (16 <= len(value) <= 320 and value.isprintable()):
                raise ConfigError(f"{flag} must be 16..200 printable characters (or the full token printed)")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if self.api_keys_file is not None:
            object.__setattr__(self, "api_keys_file", Path(self.api_keys_file))
        if not 2 <= self.node_cert_lifetime_s <= 30 * 86400:  # seconds only make sense in tests
            raise ConfigError("--node-cert-lifetime-s must be in 2..2592000 (30 days)")
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if not (math.isfinite(self.referee_flops_per_s) and 0 <= self.referee_flops_per_s <= 1e16):
            raise ConfigError("--referee-gflops must be a number in 0..10000000 (0 turns the referee off)")


def prepare_tokens(db: Database, state_dir: Path, ca: CoordinatorCA, *, join: str | None = None,
                   admin: str | None = None, read: str | None = None) -> dict[str, str]:
    """The full tokens (``swarm1.<CA fingerprint>.<secret>``) by kind (join, admin, read): each
    secret given (a bare secret or this CA's full token), else the stored one, else new; stored
    in SQLite and 0600 files of ``state_dir`` (coordinator/credentials.py). ConfigError for a
    token of another CA or two kinds sharing a secret."""
    return credentials.load_or_create(db, state_dir, ca.fingerprint,
                                      {credentials.JOIN: join, credentials.ADMIN: admin, credentials.READ: read})


def load_or_create_token(db: Database, state_dir: Path, given: str | None = None) -> str:
    """The join token's secret: ``given``, else the stored one, else new (SQLite and ``join_token``)."""
    return credentials.join_secret(db, state_dir, given)


def prepare_join_token(db: Database, state_dir: Path, ca: CoordinatorCA, given: str | None) -> str:
    """The full join token (see :func:`prepare_tokens`); the other tokens are created if missing."""
    return prepare_tokens(db, state_dir, ca, join=given)[credentials.JOIN]


class CoordinatorApp:
    """Owns everything the coordinator runs. ``start()`` then ``stop()``; not restartable."""

    def __init__(self, config: CoordinatorConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.state_dir)
        self.ca = CoordinatorCA(self.state_dir, now_s=self.clock.time())
        # What nodes and users present (and what is compared, in constant time): the whole token.
        tokens = prepare_tokens(self.db, self.state_dir, self.ca, join=config.join_token, admin=config.admin_token,
                                read=config.read_token)
        self.credentials = credentials.Credentials(self.db, self.state_dir, self.ca.fingerprint, tokens,
                                                   api_keys=config.api_keys, api_keys_file=config.api_keys_file)
        if config.bench_plaintext:
            self.security = PlaintextSecurity(certs.COORDINATOR)
        else:
            key_pem, chain = self.ca.issue_server([config.host, config.http_host or "", *config.tls_sans],
                                                  now_s=self.clock.time())
            self.security = TlsSecurity(ca_pem=self.ca.ca_pem, key_pem=key_pem, cert_pem=chain)
        self._certs: dict[str, tuple[bytes, float]] = {}  # node id -> (TLS public key, issued at)
        grace_s = 3 * config.node_timeout_s if config.restart_grace_s is None else config.restart_grace_s
        self.registry = NodeRegistry(self.db, self.clock, node_timeout_s=config.node_timeout_s, grace_s=grace_s)
        self.network = NetworkStore(self.db)
        self.measurements = MeasurementScheduler(self.network, self.clock, config.measurement)
        self.probes = ProbeBook(self.clock)  # both ends of each probe (coordinator/network.py)
        self.challenges = Challenges(self.registry.trust, self.clock)  # compute challenges at join
        self.admission = Admission(self.db, self.clock, config.admission, max_clock_skew_s=MAX_CLOCK_SKEW_S)
        self.reachability = Reachability(self, relay_port=config.relay_port, relay_limits=config.relay_limits)
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.services = Services()
        self.host = CoordinatorHost(clock=self.clock, state_dir=self.state_dir, db=self.db, registry=self.registry,
                                    network=self.network, authenticate_node=self.authenticate_node,
                                    authenticate_user=self.authenticate_user, authorize_read=self.authorize_read,
                                    services=self.services,
                                    max_model_params=config.max_model_params, security=self.security,
                                    rebalance=config.rebalance, helpers=config.helpers,
                                    referee_flops_per_s=config.referee_flops_per_s)
        self.plugin_modules = plugin_registry.load_plugins(config.plugins)
        self.plugins: list[CoordinatorPlugin] = []
        self.grpc_server = make_server(max_message_bytes=CONTROL_MAX_MESSAGE_BYTES, max_workers=config.max_workers,
                                       stream_limits=config.stream_limits)
        self.web_app = build_web_app(self)
        self.http: HttpServer | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._started_plugins: list[CoordinatorPlugin] = []

    # -- sessions (who is calling) -------------------------------------------------------------
    def new_session(self, node_id: str) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[node_id] = session
        return session

    def end_session(self, node_id: str) -> None:
        with self._lock:
            self._sessions.pop(node_id, None)
            self._certs.pop(node_id, None)

    # -- certificates (what the node's TLS key is, when to renew) --------------------------------
    def issue_certificate(self, node_id: str, tls_public_key: bytes) -> str:
        """A certificate for the TLS key of a node that just proved its id (signed registration)."""
        now = self.clock.time()
        pem = self.ca.issue_node(node_id, tls_public_key, now_s=now, lifetime_s=self.config.node_cert_lifetime_s)
        with self._lock:
            self._certs[node_id] = (bytes(tls_public_key), now)
        return pem.decode()

    def renewed_certificate(self, node_id: str) -> str:
        """A fresh certificate for the node's registered key once half of the current one's lifetime
        has passed, else ''. The key never changes within a registration."""
        now = self.clock.time()
        with self._lock:
            held = self._certs.get(node_id)
        if held is None or now - held[1] < self.config.node_cert_lifetime_s / 2:
            return ""
        return self.issue_certificate(node_id, held[0])

    def authenticate_node(self, context) -> str:
        """The node id of the caller, checked against its session. Raises AuthError."""
        node_id, session = read_credentials(context)
        if not node_id or not session:
            raise AuthError("this call needs swarm-node-id and swarm-session metadata; register first")
        if not is_node_id(node_id) or len(session) > MAX_SESSION_CHARS:
            raise AuthError("malformed swarm-node-id or swarm-session metadata")
        with self._lock:
            expected = self._sessions.get(node_id)
        if expected is None or not hmac.compare_digest(expected.encode(), session.encode()):
            raise AuthError(f"unknown session for node {node_id} (the coordinator may have restarted); register again")
        return node_id

    # -- tokens (what users and nodes present) -------------------------------------------------------
    @property
    def join_token(self) -> str:
        """The current join token (nodes register with it); changes when rotated."""
        return self.credentials.token(credentials.JOIN)

    @property
    def admin_token(self) -> str:
        return self.credentials.token(credentials.ADMIN)

    @property
    def read_token(self) -> str:
        return self.credentials.token(credentials.READ)

    def token_kind(self, given: str) -> str | None:
        """``join``, ``admin`` or ``read`` when ``given`` is that current token, else None."""
        return self.credentials.kind_of(given)

    def authenticate_user(self, context, action: str) -> None:
        """Allow ``action`` (a change to what the swarm runs) only with the admin token in the
        ``swarm-api-token`` metadata. Raises AuthError (none, wrong) or PermissionDeniedError
        (the join or read token)."""
        given = read_api_token(context)
        credentials.admin_access(self.token_kind(given), bool(given), action)

    def authorize_read(self, context) -> credentials.Access:
        """What a gRPC reader may see (``swarm-api-token``: the read or admin token gives FULL;
        none gives PUBLIC with ``--public-status``). Raises AuthError / PermissionDeniedError."""
        given = read_api_token(context)
        return credentials.read_access(self.token_kind(given), bool(given), public_status=self.config.public_status)

    def check_nonce(self, nonce: bytes, timestamp_s: float) -> None:
        """Refuse a registration payload seen before (replay), also across restarts (SQLite)."""
        self.admission.check_nonce(nonce)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> tuple[int, int]:
        """Start gRPC, HTTP, plugins and the liveness sweeper; returns (grpc_port, http_port)."""
        cfg = self.config
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self), self.grpc_server)
        self.reachability.install(self.grpc_server)
        self.plugins = plugin_registry.create_plugins(self.plugin_modules, self.host)
        for plugin in self.plugins:
            plugin.install_grpc(self.grpc_server)
            plugin.install_http(self.web_app)
        # Clients without certificates (users) must reach this port: it does not ask for one.
        self.grpc_port = bind(self.grpc_server, cfg.host, cfg.port, security=self.security, require_client_auth=False)
        self.admission.own_hosts = local_hosts(cfg.host)
        self.admission.own_ports.add(self.grpc_port)
        self.grpc_server.start()
        self.http = HttpServer(self.web_app, cfg.http_host or cfg.host, cfg.http_port, ssl_context=self._http_ssl())
        try:
            self.http_port = self.http.start()
            self.admission.own_ports.add(self.http_port)
        except OSError as exc:
            self.grpc_server.stop(0)
            raise ConfigError(f"cannot serve HTTP on port {cfg.http_port} ({exc}); pick another --http-port") from exc
        try:
            if relay_port := self.reachability.start():
                self.admission.own_ports.add(relay_port)
        except ConfigError:
            self.grpc_server.stop(0)
            self.http.stop()
            raise
        self.registry.begin_grace()  # counted from now: loading plugins may take seconds
        self._sweeper = threading.Thread(target=self._sweep_loop, name="liveness", daemon=True)
        self._sweeper.start()
        for plugin in self.plugins:
            plugin.start()
            self._started_plugins.append(plugin)
        log.info("coordinator serving grpc_port=%d http_port=%d state_dir=%s plugins=%s",
                 self.grpc_port, self.http_port, self.state_dir, [m.__name__ for m in self.plugin_modules])
        return self.grpc_port, self.http_port

    def _http_ssl(self):
        if self.config.http_tls_cert is None:
            return None
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(self.config.http_tls_cert), str(self.config.http_tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load --tls-cert/--tls-key ({exc}); give a PEM certificate chain and its key") from exc
        return ctx

    def _sweep_loop(self) -> None:
        last_flush = self.clock.monotonic()
        while not self._stop.wait(self.config.sweep_interval_s):
            try:
                for node_id in self.registry.sweep():
                    self.measurements.forget(node_id)
                self.admission.forget(self.registry.purge(self.config.admission.lost_node_ttl_s))
                if self.clock.monotonic() - last_flush >= self.config.flush_interval_s:
                    self.registry.flush()
                    last_flush = self.clock.monotonic()
            except Exception:  # noqa: BLE001 -- the sweeper must outlive a bad sweep
                log.exception("liveness sweep failed")

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        stop_plugins(self._started_plugins)
        self.reachability.stop()
        if self.http is not None:
            self.http.stop()
        self.grpc_server.stop(grace_s).wait(grace_s + 5)
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        self.registry.close()
        self.admission.close()
        self.network.close()
