"""The node agent: identity, hardware, peer server, registration, heartbeats, measurements.

Protocol with the coordinator (see coordinator.proto): register with a signed payload and the
join token; heartbeat every interval (the reply may hand out link measurements, run on a
worker thread and reported back: node/measure_worker.py); when a heartbeat says the session is
unknown (coordinator restarted) register again; when the coordinator is unreachable, log it,
back off and retry; on stop, leave cleanly.

Extension seams: plugins never get this object. Each plugin module listed in
:mod:`node.plugins` has a factory ``create(host)``; the agent builds one
:class:`node.plugins.NodeHost` (node_id, device, state_dir, clock, coordinator_channel,
call_metadata, wait_registered, update_metrics, traffic) and calls each factory once at
``start()``. The returned :class:`node.plugins.NodePlugin` objects get ``install(server)`` (the
peer gRPC server, before it starts), ``start()`` once it serves, and ``stop()`` (reverse order)
before the node leaves. Heartbeats carry the plugins' ``update_metrics`` values and the
``traffic`` totals (``bytes_sent`` / ``bytes_received``) and link observations.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm import certs
from swarm.clock import Clock, SystemClock
from swarm.errors import (
    AuthError, ConfigError, InvalidRequestError, NotFoundError, SwarmError, UnavailableError, VersionMismatchError,
)
from swarm.faults import NO_FAULTS, FaultConfig
from swarm.hardware import HardwareInfo, free_memory_bytes, probe, use_device
from swarm.identity import Identity
from swarm.plugins import stop_plugins
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import peer_pb2_grpc
from swarm.transport.auth import call_metadata
from swarm.transport.channels import DATA_MAX_MESSAGE_BYTES, bind, make_server, parse_address
from swarm.transport.convert import metrics_to_json
from swarm.transport.limits import StreamLimits
from swarm.transport.relay import RelayLimits
from swarm.transport.tls import PlaintextSecurity, TlsSecurity, pinned_ca

from node import plugins as plugin_registry
from node.plugins import NodeHost, NodePlugin
from node.coordinator_link import Backoff, CoordinatorLink
from node.measure_worker import CHALLENGE_TASK, MeasureWorker
from node.peer_service import PeerServicer
from node.relay_link import NodeRelay
from node.traffic import Traffic

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    coordinator_address: str
    token: str
    state_dir: Path
    name: str | None = None  # None: hostname-<id prefix>
    device: str = "cpu"
    host: str = "0.0.0.0"
    port: int = 0
    advertise_host: str | None = None  # None: the local address that reaches the coordinator
    heartbeat_interval_s: float | None = None  # None: what the coordinator says
    matmul_duration_s: float = 1.0
    plugins: tuple[str, ...] = field(default=plugin_registry.PLUGINS)
    seed: int = 0
    stream_limits: StreamLimits = field(default_factory=StreamLimits)  # peer server: streams per peer, idle deadline
    bench_plaintext: bool = False  # BENCHMARK ONLY (SWARM_BENCH_PLAINTEXT=1): no TLS on gRPC
    faults: FaultConfig = NO_FAULTS  # SWARM_FAULT: injected misbehaviour, for tests only (swarm/faults.py)
    relay_port: int | None = None  # --relay: offer relaying on this TCP port (0 picks one); None: don't
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    hole_punching: bool = True  # relayed: punch holes to other NAT'd nodes (--no-hole-punching: relay only)
    step_wire_port: int = 0  # inference steps' TLS socket (swarm/transport/step_wire.py): 0 picks one, -1: none

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        parse_address(self.coordinator_address)
        if not self.token:
            raise ConfigError("a join token is needed: pass --token (printed by the coordinator at start)")
        if not 0 <= self.port <= 65535:
            raise ConfigError("--port must be in 0..65535")
        if self.relay_port is not None and not 0 <= self.relay_port <= 65535:
            raise ConfigError("--relay-port must be in 0..65535")
        if not -1 <= self.step_wire_port <= 65535:
            raise ConfigError("--step-wire-port must be in 0..65535 (0: a free port), or -1 for none")
        if self.heartbeat_interval_s is not None and not 0.05 <= self.heartbeat_interval_s <= 60:
            raise ConfigError("--heartbeat-interval-s must be in 0.05..60")
        if not 0.01 <= self.matmul_duration_s <= 30:
            raise ConfigError("--probe-seconds must be in 0.01..30")


def local_address_towards(host: str) -> str:
    """The local IP this machine uses to reach ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def default_name(node_id: str) -> str:
    """hostname-<id prefix>, restricted to the characters the coordinator accepts."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:40].strip("-._") or "node"
    return f"{host}-{node_id[:6]}"


class NodeAgent(MeasureWorker):
    def __init__(self, config: NodeConfig, *, hardware: HardwareInfo | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(self.state_dir)
        self.node_id = self.identity.node_id
        self.coordinator_address = config.coordinator_address
        self.name = config.name or default_name(self.node_id)
        self.hardware = hardware or probe(config.device, disk_path=self.state_dir, matmul_duration_s=config.matmul_duration_s)
        if config.faults.claim_tflops is not None:  # a liar's claim (testing the challenge)
            log.warning("SWARM_FAULT: claiming %.1f TFLOPS (measured %.4f)", config.faults.claim_tflops,
                        self.hardware.tflops)
            self.hardware = dataclasses.replace(self.hardware, tflops=config.faults.claim_tflops)
        if config.faults.claim_mem_bandwidth is not None or config.faults.claim_device is not None:
            f = config.faults  # claimed hardware (testing placement on one machine's nodes)
            log.warning("SWARM_FAULT: claiming mem_bandwidth=%s device=%s", f.claim_mem_bandwidth, f.claim_device)
            self.hardware = dataclasses.replace(
                self.hardware, mem_bandwidth_Bps=f.claim_mem_bandwidth or self.hardware.mem_bandwidth_Bps,
                device_name=f.claim_device or self.hardware.device_name)
        self.device = self.hardware.device
        use_device(self.device)
        self.metrics: dict[str, Any] = {}
        self.metrics_lock = threading.Lock()
        self.traffic = Traffic()
        self.status = "idle"
        self.plugin_modules = plugin_registry.load_plugins(config.plugins)
        self.plugins: list[NodePlugin] = []
        self.peer_server = make_server(max_message_bytes=DATA_MAX_MESSAGE_BYTES, stream_limits=config.stream_limits)
        self.peer_port = 0
        self.peer_address = ""
        self.fatal_error: SwarmError | None = None
        # TLS: a P-256 key per process (grpc's TLS cannot use the Ed25519 identity key), certified
        # by the coordinator at registration for this node id; the CA is pinned from the token.
        self._tls_key = certs.new_key()
        self.tls_public_key = certs.public_key_der(self._tls_key)
        if config.bench_plaintext:
            self.security = PlaintextSecurity(self.node_id)
        else:
            self.security = TlsSecurity(key_pem=certs.key_pem(self._tls_key))
        self.probe_sources: frozenset[str] = frozenset()  # who may BandwidthProbe us now (heartbeats say)
        self._link = CoordinatorLink(config.coordinator_address, self.identity, self.clock, security=self.security)
        self.coordinator_channel = self._link.channel
        self._session: str | None = None
        self._session_lock = threading.Lock()
        self._registered = threading.Event()
        self._stop = threading.Event()
        self._tasks: queue.Queue = queue.Queue(maxsize=16)
        self._threads: list[threading.Thread] = []
        self._started_plugins: list[NodePlugin] = []
        self.heartbeat_interval_s = config.heartbeat_interval_s or 2.0
        self.host = NodeHost(node_id=self.node_id, device=self.device, state_dir=self.state_dir, clock=self.clock,
                             coordinator_channel=self.coordinator_channel, call_metadata=self.call_metadata,
                             wait_registered=self.wait_registered, update_metrics=self.update_metrics,
                             traffic=self.traffic, security=self.security, faults=config.faults,
                             listen_host=config.host, step_wire_port=config.step_wire_port,
                             sign=self.identity.sign)
        self.peer_servicer: PeerServicer | None = None
        self.relay = NodeRelay(node_id=self.node_id, security=self.security, coordinator_channel=self.coordinator_channel,
                               call_metadata=self.call_metadata, offer_port=config.relay_port, bind_host=config.host,
                               relay_limits=config.relay_limits, hole_punching=config.hole_punching)

    # -- seams for plugins -------------------------------------------------------------------
    def update_metrics(self, **values: Any) -> None:
        with self.metrics_lock:
            self.metrics.update(values)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata tying a call to this node's session. Raises UnavailableError if not registered."""
        with self._session_lock:
            session = self._session
        if session is None:
            raise UnavailableError("this node is not registered with the coordinator yet; retry shortly")
        return call_metadata(self.node_id, session)

    def wait_registered(self, timeout_s: float) -> bool:
        return self._registered.wait(timeout_s)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        """Start the peer server, plugins and the heartbeat loop; returns the peer port."""
        self.peer_servicer = PeerServicer(self.node_id, traffic=self.traffic, identify=self.security.peer_identity,
                                          probe_sources=lambda: self.probe_sources)
        peer_pb2_grpc.add_PeerServicer_to_server(self.peer_servicer, self.peer_server)
        self.plugins = plugin_registry.create_plugins(self.plugin_modules, self.host)
        for plugin in self.plugins:
            plugin.install(self.peer_server)
        self.relay.install(self.peer_server)
        # Only holders of a swarm certificate complete a handshake here. Until this node is
        # certified it presents a placeholder nobody trusts (see TlsSecurity).
        self.peer_port = bind(self.peer_server, self.config.host, self.config.port, security=self.security,
                              require_client_auth=True)
        self.peer_server.start()
        host = self.config.advertise_host
        if not host:
            bind_host = self.config.host
            if bind_host in ("0.0.0.0", "::", ""):
                host = local_address_towards(parse_address(self.coordinator_address)[0])
            else:
                host = bind_host
        self.peer_address = f"{host}:{self.peer_port}"
        self.relay.start_offer()
        for plugin in self.plugins:
            plugin.start()
            self._started_plugins.append(plugin)
        for target, name in ((self._run, "heartbeat"), (self._measure_worker, "measure")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("node started id=%s name=%s peer_address=%s device=%s tflops=%.3f",
                 self.node_id, self.name, self.peer_address, self.device, self.hardware.tflops)
        return self.peer_port

    def stop(self, *, leave: bool = True) -> None:
        self._stop.set()
        stop_plugins(self._started_plugins)
        for t in self._threads:
            t.join(timeout=15)
        self.relay.stop()
        with self._session_lock:
            session, self._session = self._session, None
        if leave and session is not None:
            try:
                self._link.leave(session)
                log.info("left the swarm id=%s", self.node_id)
            except SwarmError as exc:
                log.warning("could not leave cleanly: %s", exc)
        self.peer_server.stop(1.0).wait(6)
        self._link.close()

    # -- the loop ------------------------------------------------------------------------------
    def _pin_ca(self) -> None:
        """Trust the coordinator's CA once it matches the token's fingerprint (stored in the state
        dir). AuthError (fatal): an old-format token or a mismatch; UnavailableError: retry."""
        token = certs.parse_token(self.config.token)
        if isinstance(self.security, PlaintextSecurity) or self.security.ca_pem is not None:
            return
        self.security.set_ca(pinned_ca(self.state_dir, self.coordinator_address, token.fingerprint))
        log.info("pinned the coordinator's CA fingerprint=%s", token.fingerprint[:16])

    def _take_certificate(self, cert_pem: bytes) -> None:
        if isinstance(self.security, PlaintextSecurity):
            return
        certs.check_node_certificate(cert_pem, node_id=self.node_id, tls_public_key_der=self.tls_public_key,
                                     ca_pem=self.security.ca_pem)
        self.security.set_certificate(cert_pem)
        not_before, not_after = certs.validity(cert_pem)
        log.info("TLS certificate valid until %s (%.0f s)", not_after, not_after - not_before)

    def _register(self) -> None:
        self._pin_ca()
        reg = self._link.register(name=self.name, peer_address=self.peer_address, hardware=self.hardware,
                                  token=self.config.token, tls_public_key=self.tls_public_key,
                                  relay_port=self.relay.relay_port)
        self._take_certificate(reg.certificate_pem)
        with self._session_lock:
            self._session = reg.session
        # serving the new certificate now: the coordinator dials back (proof of id) before it
        # sends anyone here; relayed nodes start listening on their relay
        self._check_reachability(reg.session)
        if self.config.heartbeat_interval_s is None:
            self.heartbeat_interval_s = reg.heartbeat_interval_s
        self._registered.set()
        log.info("registered with coordinator=%s id=%s", self.coordinator_address, self.node_id)
        try:
            self._tasks.put_nowait(CHALLENGE_TASK)  # the measure worker runs it (one at a time with probes)
        except queue.Full:
            log.warning("measurement queue full; the compute challenge waits for the next registration")

    def _check_reachability(self, session: str) -> None:
        local_host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else "::1" if self.config.host == "::" \
            else self.config.host
        self.relay.check(self._link, session, coordinator_address=self.coordinator_address,
                         local_address=(local_host, self.peer_port), now_s=self.clock.monotonic())

    def _heartbeat(self) -> None:
        with self._session_lock:
            session = self._session
        if self.relay.due(self.clock.monotonic()):  # still pending: the dial-back failed or no relay yet
            self._check_reachability(session)
        self.update_metrics(**self.traffic.totals(), **self.relay.metrics())
        with self.metrics_lock:
            metrics = dict(self.metrics)
        try:
            metrics_json = metrics_to_json(metrics)
        except (InvalidRequestError, ValueError, TypeError) as exc:
            log.warning("metrics not sendable (%s); sending none", exc)
            metrics_json = "{}"
        free = min(free_memory_bytes(self.device), self.hardware.memory_bytes)
        transfers = [pb.TransferObservation(dst_node_id=o.dst_node_id, num_bytes=o.num_bytes, seconds=o.seconds)
                     for o in self.traffic.drain()]  # lost if this beat fails: they are only samples
        receipts = [pb.ProbeReceipt(task_id=t, bytes_received=b, timed_bytes=tb, first_to_last_s=s)
                    for t, b, tb, s in (self.peer_servicer.drain_receipts() if self.peer_servicer else [])]
        reply = self._link.heartbeat(session, status=self.status, metrics_json=metrics_json, memory_free_bytes=free,
                                     transfers=transfers, probes_received=receipts)
        if reply.certificate_pem:
            try:
                self._take_certificate(reply.certificate_pem.encode())
            except AuthError as exc:
                log.error("ignoring a renewed certificate: %s", exc)
        self.probe_sources = frozenset(reply.probe_sources)
        if self.config.heartbeat_interval_s is None and reply.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = min(max(reply.heartbeat_interval_s, 0.05), 60.0)
        for task in reply.tasks:
            try:
                self._tasks.put_nowait(task)
            except queue.Full:
                log.warning("measurement queue full; dropping task for dst=%s", task.dst_node_id[:8])

    def _run(self) -> None:
        # At most 2 s between tries: a restarted coordinator gives restored nodes a grace period of
        # 3 node timeouts (18 s by default) to register again before it declares them lost.
        backoff = Backoff(seed=self.config.seed, max_s=RECONNECT_MAX_S)
        unreachable_since: float | None = None
        while not self._stop.is_set():
            try:
                if self._session is None:
                    self._register()
                else:
                    self._heartbeat()
                if unreachable_since is not None:
                    log.warning("coordinator at %s is reachable again", self.coordinator_address)
                    unreachable_since = None
                backoff.reset()
                self._stop.wait(self.heartbeat_interval_s)
            except UnavailableError as exc:
                if unreachable_since is None:
                    unreachable_since = self.clock.monotonic()
                delay = backoff.next_delay_s()
                log.warning("cannot reach the coordinator: %s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
            except (AuthError, NotFoundError, VersionMismatchError, InvalidRequestError) as exc:
                if self._session is None:  # registration itself refused: wrong token, version, input
                    self._fatal(exc)
                    return
                if isinstance(exc, (AuthError, NotFoundError)):
                    log.warning("coordinator does not know this session (%s); registering again", exc)
                    with self._session_lock:
                        self._session = None
                    self._registered.clear()
                else:  # a refused heartbeat: say so, keep the node up
                    log.error("coordinator refused a heartbeat: %s", exc)
                    self._stop.wait(self.heartbeat_interval_s)
            except Exception:  # noqa: BLE001 -- a bug in one beat must not kill the node
                log.exception("heartbeat loop error")
                self._stop.wait(backoff.next_delay_s())

    def _fatal(self, exc: SwarmError) -> None:
        log.error("the coordinator refused this node: %s", exc)
        self.fatal_error = exc
        self._stop.set()
