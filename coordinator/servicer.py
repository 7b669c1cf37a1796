"""gRPC servicer of the coordinator's control plane (protos/swarm/proto/v1/coordinator.proto).

Thin: it validates requests, translates protobuf to domain objects and calls the app. Every
method is wrapped by :func:`swarm.transport.errors.grpc_errors`, so a bad request gets its
status code and a message saying what to do, and the server keeps serving.
"""

from __future__ import annotations

import logging
import math
import re

from google.protobuf.message import DecodeError

import swarm
from swarm.errors import AuthError, CapacityError, InvalidRequestError, PermissionDeniedError, VersionMismatchError
from swarm.identity import is_node_id, verify
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.transport.channels import parse_address
from swarm.transport.convert import hardware_from_proto, link_to_proto, metrics_from_json, node_to_proto
from swarm.transport.errors import grpc_errors

from coordinator.credentials import Access
from coordinator.network import bound_transfer, transfer_link

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 16 << 10
MAX_CLOCK_SKEW_S = 300.0
MAX_STATUS_CHARS = 200
MAX_TRAFFIC_BYTES = 1 << 60  # bytes_sent / bytes_received beyond this are not a real counter
MAX_TRANSFERS_PER_BEAT = 64
MAX_TRANSFER_BYTES = 1 << 40
MAX_TRANSFER_S = 3600.0
MAX_TRANSFER_BPS = 1e13  # the same plausibility bound as probes
MAX_RECEIPTS_PER_BEAT = 16
MAX_CHALLENGE_DIGEST_BYTES = 64 * 4096 * 32  # count x n row digests at most
MAX_CHALLENGE_ROW_BYTES = 16 * 4096 * 4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_protocol_version(theirs: str) -> None:
    """Refuse a different major protocol version."""
    ours = swarm.PROTOCOL_VERSION
    if not theirs:
        raise VersionMismatchError(f"the node sent no protocol version; this coordinator speaks {ours}: upgrade the node")
    if theirs.split(".")[0] != ours.split(".")[0]:
        raise VersionMismatchError(
            f"the node speaks protocol {theirs[:20]} but this coordinator speaks {ours}; "
            "upgrade the older side (pip install -U volunteer-swarm)"
        )


def check_traffic_metrics(metrics: dict) -> None:
    """``bytes_sent`` / ``bytes_received`` (node/traffic.py), when present: integers in 0..2**60."""
    for key in ("bytes_sent", "bytes_received"):
        if key not in metrics:
            continue
        v = metrics[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TRAFFIC_BYTES:
            raise InvalidRequestError(f"metrics {key} must be an integer byte count in 0..{MAX_TRAFFIC_BYTES}, "
                                      f"got {str(v)[:40]!r}")


def check_transfers(transfers, src: str) -> dict[str, list[tuple[int, float]]]:
    """Validate heartbeat transfer observations; returns (num_bytes, seconds) lists by destination."""
    if len(transfers) > MAX_TRANSFERS_PER_BEAT:
        raise InvalidRequestError(f"a heartbeat carries at most {MAX_TRANSFERS_PER_BEAT} transfer observations")
    out: dict[str, list[tuple[int, float]]] = {}
    for t in transfers:
        if not is_node_id(t.dst_node_id) or t.dst_node_id == src:
            raise InvalidRequestError("transfer dst_node_id must be another node's id")
        if not 0 < t.num_bytes <= MAX_TRANSFER_BYTES:
            raise InvalidRequestError(f"transfer num_bytes must be in 1..{MAX_TRANSFER_BYTES}, got {t.num_bytes}")
        if not (math.isfinite(t.seconds) and 0 < t.seconds <= MAX_TRANSFER_S):
            raise InvalidRequestError(f"transfer seconds must be finite and in (0, {MAX_TRANSFER_S:.0f}], got {t.seconds}")
        if t.num_bytes / t.seconds > MAX_TRANSFER_BPS:
            raise InvalidRequestError("transfer bandwidth is out of any plausible range")
        out.setdefault(t.dst_node_id, []).append((int(t.num_bytes), float(t.seconds)))
    return out


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Implements Register / Heartbeat / Leave / ReportMeasurement / ListNodes / GetNetwork."""

    def __init__(self, app) -> None:
        self.app = app

    @grpc_errors
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterReply:
        app = self.app
        if len(request.payload) > MAX_PAYLOAD_BYTES:
            raise InvalidRequestError(f"registration payload is larger than {MAX_PAYLOAD_BYTES} bytes")
        if not request.payload:
            raise InvalidRequestError("registration payload is empty; upgrade the node")
        payload = pb.RegistrationPayload()
        try:
            payload.ParseFromString(request.payload)
        except DecodeError as exc:
            raise InvalidRequestError("registration payload is not a RegistrationPayload message") from exc
        check_protocol_version(payload.protocol_version)
        if not request.token:
            raise AuthError("no join token given: pass --token or set SWARM_TOKEN (the token "
                            "swarm-coordinator serve printed at start)")
        kind = app.token_kind(request.token)
        if kind in ("admin", "read"):
            raise PermissionDeniedError(f"that is the coordinator's {kind} token; nodes join with the join token "
                                        "(token= in the READY line of swarm-coordinator serve)")
        if kind != "join":
            raise AuthError("wrong join token: use the token printed by swarm-coordinator serve "
                            "(READY ... token=...); it may have been rotated (swarm-coordinator rotate-token)")
        node_id = verify(request.public_key, request.signature, request.payload)
        if payload.node_id != node_id:
            raise AuthError("node_id does not match the public key; the node's state dir may be corrupt")
        skew = abs(app.clock.time() - payload.timestamp_s)
        if not math.isfinite(payload.timestamp_s) or skew > MAX_CLOCK_SKEW_S:
            raise AuthError(
                f"registration timestamp is {skew:.0f} s away from the coordinator's clock; sync the node's clock (NTP)"
            )
        if not 8 <= len(payload.nonce) <= 64:
            raise InvalidRequestError("registration nonce must be 8..64 bytes")
        app.check_nonce(payload.nonce, payload.timestamp_s)
        if not NAME_RE.match(payload.name):
            raise InvalidRequestError(
                f"node name {payload.name[:80]!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
            )
        parse_address(payload.peer_address)
        hardware = hardware_from_proto(payload.hardware)
        if not 0 < len(payload.tls_public_key) <= 1024:
            raise InvalidRequestError("the registration carries no TLS public key; upgrade the node")
        nodes = app.registry.snapshot()
        app.admission.check_peer_address(payload.peer_address, node_id, nodes)
        known = {n.id for n in nodes}
        if node_id not in known and len(known) >= app.config.max_nodes:
            raise CapacityError(
                f"this coordinator already knows {len(known)} nodes (its limit); ask its operator to raise it"
            )
        app.admission.admit_identity(request.token, node_id)  # per-token limits (coordinator/admission.py)
        if not 0 <= payload.relay_port <= 65535:
            raise InvalidRequestError("relay_port must be in 0..65535")
        relay_address = ""
        if payload.relay_port:
            relay_address = f"{payload.peer_address.rpartition(':')[0]}:{payload.relay_port}"
        # pending: no work and no peer is sent to it until CheckReachability proved its address
        app.registry.register(
            node_id=node_id, name=payload.name, public_key=bytes(request.public_key),
            peer_address=payload.peer_address, hardware=hardware, reachability="pending",
            relay_address=relay_address,
        )
        certificate = app.issue_certificate(node_id, payload.tls_public_key)  # AuthError for a bad key
        session = app.new_session(node_id)
        return pb.RegisterReply(
            node_id=node_id, session=session, heartbeat_interval_s=app.config.heartbeat_interval_s,
            coordinator_version=swarm.__version__, protocol_version=swarm.PROTOCOL_VERSION,
            certificate_pem=certificate,
        )

    @grpc_errors
    def CheckReachability(self, request: pb.ReachabilityRequest, context) -> pb.ReachabilityReply:
        node_id = self.app.authenticate_node(context)
        if len(request.coordinator_host) > 253:
            raise InvalidRequestError("coordinator_host is longer than a host name")
        return self.app.reachability.check(node_id, peer=context.peer(), coordinator_host=request.coordinator_host)

    @grpc_errors
    def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        app = self.app
        node_id = app.authenticate_node(context)
        if len(request.status) > MAX_STATUS_CHARS:
            raise InvalidRequestError(f"status is longer than {MAX_STATUS_CHARS} characters")
        metrics = metrics_from_json(request.metrics_json)
        check_traffic_metrics(metrics)
        transfers = check_transfers(request.transfers, node_id)
        if request.memory_free_bytes < 0:
            raise InvalidRequestError("memory_free_bytes must be >= 0")
        app.registry.heartbeat(
            node_id, status=request.status, metrics=metrics,
            memory_free_bytes=request.memory_free_bytes or None,
        )
        self._record_transfers(node_id, transfers)
        self._record_receipts(node_id, request.probes_received)
        reply = pb.HeartbeatReply(heartbeat_interval_s=app.config.heartbeat_interval_s, server_time_s=app.clock.time(),
                                  certificate_pem=app.renewed_certificate(node_id))
        # who may BandwidthProbe this node: the sources of its measurement tasks (the node refuses others)
        reply.probe_sources.extend(app.measurements.probe_sources(node_id))
        task = app.measurements.next_task(node_id, app.registry.online())
        if task is not None:
            app.probes.expect(task.task_id, node_id, task.dst)
            reply.tasks.append(pb.MeasureTask(
                task_id=task.task_id, dst_node_id=task.dst, dst_address=task.dst_address,
                probe_bytes=task.probe_bytes, num_pings=task.num_pings,
            ))
        return reply

    def _record_receipts(self, node_id: str, receipts) -> None:
        """What this node saw as the RECEIVER of probes: pairs them with the senders' reports."""
        if len(receipts) > MAX_RECEIPTS_PER_BEAT:
            raise InvalidRequestError(f"a heartbeat carries at most {MAX_RECEIPTS_PER_BEAT} probe receipts")
        for r in receipts:
            if len(r.task_id) > 64 or not (0 <= r.timed_bytes <= r.bytes_received <= 1 << 30) or not (
                    math.isfinite(r.first_to_last_s) and 0 <= r.first_to_last_s <= 600):
                raise InvalidRequestError("probe receipt out of range")
            link = self.app.probes.receipt(node_id, r.task_id, int(r.timed_bytes), float(r.first_to_last_s))
            if link is not None:
                self.app.network.record(link)
        for link in self.app.probes.expired():
            self.app.network.record(link)

    def _record_transfers(self, node_id: str, transfers: dict[str, list[tuple[int, float]]]) -> None:
        """Feed transfer observations to known destinations into the network store (see transfer_link)."""
        if not transfers:
            return
        known = {n.id for n in self.app.registry.snapshot()}
        now = self.app.clock.time()
        for dst, obs in transfers.items():
            if dst not in known:
                log.debug("ignoring transfer observations from %s to unknown node %s", node_id[:8], dst[:8])
                continue
            existing = self.app.network.get(node_id, dst)
            link = bound_transfer(existing, transfer_link(existing, obs, now))
            if link is not None:
                self.app.network.record(link)

    @grpc_errors
    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        node_id = self.app.authenticate_node(context)
        if len(request.reason) > MAX_STATUS_CHARS:
            raise InvalidRequestError(f"leave reason is longer than {MAX_STATUS_CHARS} characters")
        self.app.registry.leave(node_id)
        self.app.end_session(node_id)
        self.app.measurements.forget(node_id)
        return pb.LeaveReply()

    @grpc_errors
    def ReportMeasurement(self, request: pb.MeasurementReport, context) -> pb.MeasurementAck:
        app = self.app
        node_id = app.authenticate_node(context)
        if len(request.task_id) > 64 or len(request.error) > 2000:
            raise InvalidRequestError("task_id or error is too long")
        if not is_node_id(request.dst_node_id):
            raise InvalidRequestError("dst_node_id is not a node id")
        failed = bool(request.error)
        if not failed:
            for name in ("rtt_s", "bandwidth_Bps"):
                v = getattr(request, name)
                if not (math.isfinite(v) and v > 0):
                    raise InvalidRequestError(f"{name} must be finite and > 0, got {v}")
            if request.rtt_s > 600 or request.bandwidth_Bps > 1e13:
                raise InvalidRequestError("rtt_s or bandwidth_Bps is out of any plausible range")
        task = app.measurements.complete(request.task_id, node_id, failed=failed)
        if task is None or task.dst != request.dst_node_id:
            raise InvalidRequestError("no such measurement task for this node (it may have timed out); ignore")
        if failed:
            log.warning("measurement failed src=%s dst=%s: %s", node_id[:8], task.dst[:8], request.error[:300])
            return pb.MeasurementAck()
        # counted only with the receiver's own receipt (ProbeBook): both ends must agree
        link = app.probes.sender_report(task.task_id, request.rtt_s, request.bandwidth_Bps)
        if link is not None:
            app.network.record(link)
        return pb.MeasurementAck()

    # -- compute challenge (swarm/challenge.py, coordinator/verification.py) ---------------------
    @grpc_errors
    def StartChallenge(self, request: pb.ChallengeRequest, context) -> pb.ComputeChallenge:
        node_id = self.app.authenticate_node(context)
        kind = self.app.registry.get(node_id).hardware.device_kind
        cid, seed, n, count, target_s = self.app.challenges.start(node_id, kind)
        return pb.ComputeChallenge(challenge_id=cid, seed=seed, n=n, count=count, target_s=target_s)

    @grpc_errors
    def CommitChallenge(self, request: pb.ChallengeCommit, context) -> pb.ChallengeOpen:
        node_id = self.app.authenticate_node(context)
        rows = self.app.challenges.commit(node_id, request.challenge_id, bytes(request.commitment),
                                          int(request.count_done))
        return pb.ChallengeOpen(rows=rows)

    @grpc_errors
    def OpenChallenge(self, request: pb.ChallengeAnswer, context) -> pb.ChallengeResult:
        node_id = self.app.authenticate_node(context)
        if len(request.row_digests) > MAX_CHALLENGE_DIGEST_BYTES or len(request.rows) > MAX_CHALLENGE_ROW_BYTES:
            raise InvalidRequestError("challenge answer is larger than any challenge")
        passed, tflops, message = self.app.challenges.open(node_id, request.challenge_id, bytes(request.row_digests),
                                                           bytes(request.rows))
        return pb.ChallengeResult(passed=passed, measured_tflops=tflops, message=message)

    @grpc_errors
    def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesReply:
        access = self.app.authorize_read(context)
        reply = pb.ListNodesReply(server_time_s=self.app.clock.time())
        for n in self.app.registry.snapshot():
            msg = node_to_proto(n)
            if access is not Access.FULL:
                msg.peer_address = ""  # never public: where a stranger could reach a volunteer's machine
            reply.nodes.append(msg)
        return reply

    @grpc_errors
    def GetNetwork(self, request: pb.GetNetworkRequest, context) -> pb.GetNetworkReply:
        self.app.authorize_read(context)  # links carry node ids and measurements, no addresses
        reply = pb.GetNetworkReply(server_time_s=self.app.clock.time())
        reply.links.extend(link_to_proto(link) for link in self.app.network.links())
        return reply
