"""The node's calls to the coordinator: signed registration, heartbeat, leave, reports.

Every method raises swarm errors (translated from gRPC statuses): UnavailableError when the
coordinator cannot be reached (retry with :class:`Backoff`), AuthError when the session is
unknown (register again) or the token is wrong, VersionMismatchError, InvalidRequestError.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass

import swarm
from swarm.clock import Clock
from swarm.hardware import HardwareInfo
from swarm.identity import Identity
from swarm.proto.v1 import coordinator_pb2 as pb
from swarm.proto.v1 import coordinator_pb2_grpc as pb_grpc
from swarm.transport.auth import call_metadata
from swarm.transport.channels import control_channel
from swarm.transport.convert import hardware_to_proto
from swarm.transport.errors import translate_rpc_errors
from swarm.transport.lazy_channels import DeferredChannel

CALL_TIMEOUT_S = 10.0


class Backoff:
    """Exponential backoff with jitter from a seeded generator: 0.5 s doubling up to max_s."""

    def __init__(self, *, initial_s: float = 0.5, max_s: float = 10.0, seed: int = 0) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._next_s = initial_s
        self._rng = random.Random(seed)

    def next_delay_s(self) -> float:
        delay = self._next_s * (0.75 + 0.5 * self._rng.random())
        self._next_s = min(self._next_s * 2, self._max_s)
        return min(delay, self._max_s)

    def reset(self) -> None:
        self._next_s = self._initial_s


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    node_id: str
    session: str
    heartbeat_interval_s: float
    certificate_pem: bytes  # the node's TLS certificate, issued for ``tls_public_key``


class CoordinatorLink:
    """One TLS channel to the coordinator, shared by the agent and its plugins (thread-safe).

    The channel is made on first use, once ``security`` holds the pinned CA (the agent pins it
    before registering); until then calls raise UnavailableError."""

    def __init__(self, address: str, identity: Identity, clock: Clock, *, security) -> None:
        self.address = address
        self._identity = identity
        self._clock = clock
        self.channel = DeferredChannel(lambda: control_channel(address, security=security))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self._what = f"coordinator at {address}"
        self._lock = threading.Lock()

    def register(self, *, name: str, peer_address: str, hardware: HardwareInfo, token: str,
                 tls_public_key: bytes, relay_port: int = 0) -> Registration:
        payload = pb.RegistrationPayload(
            protocol_version=swarm.PROTOCOL_VERSION, node_id=self._identity.node_id, name=name,
            peer_address=peer_address, hardware=hardware_to_proto(hardware),
            timestamp_s=self._clock.time(), nonce=os.urandom(16), tls_public_key=tls_public_key,
            relay_port=relay_port,
        ).SerializeToString()
        request = pb.RegisterRequest(
            payload=payload, public_key=self._identity.public_key,
            signature=self._identity.sign(payload), token=token,
        )
        with translate_rpc_errors(self._what):
            reply = self.stub.Register(request, timeout=CALL_TIMEOUT_S)
        return Registration(node_id=reply.node_id, session=reply.session,
                            heartbeat_interval_s=reply.heartbeat_interval_s or 2.0,
                            certificate_pem=reply.certificate_pem.encode())

    def check_reachability(self, session: str, *, coordinator_host: str) -> pb.ReachabilityReply:
        """Ask the coordinator to dial this node back (coordinator/reachability.py); the dial-back
        takes up to a few seconds."""
        with translate_rpc_errors(self._what):
            return self.stub.CheckReachability(pb.ReachabilityRequest(coordinator_host=coordinator_host),
                                               metadata=call_metadata(self._identity.node_id, session),
                                               timeout=CALL_TIMEOUT_S + 5)

    def heartbeat(self, session: str, *, status: str, metrics_json: str, memory_free_bytes: int = 0,
                  transfers=(), probes_received=()) -> pb.HeartbeatReply:
        with translate_rpc_errors(self._what):
            return self.stub.Heartbeat(
                pb.HeartbeatRequest(status=status, metrics_json=metrics_json, memory_free_bytes=memory_free_bytes,
                                    transfers=list(transfers), probes_received=list(probes_received)),
                metadata=call_metadata(self._identity.node_id, session), timeout=CALL_TIMEOUT_S,
            )

    def report(self, session: str, report: pb.MeasurementReport) -> None:
        with translate_rpc_errors(self._what):
            self.stub.ReportMeasurement(report, metadata=call_metadata(self._identity.node_id, session),
                                        timeout=CALL_TIMEOUT_S)

    def run_challenge(self, session: str, *, device: str) -> pb.ChallengeResult:
        """Start, compute, commit and open the coordinator's compute challenge (swarm/challenge.py)."""
        from swarm.challenge import Solver  # torch: only when a challenge runs

        md = call_metadata(self._identity.node_id, session)
        with translate_rpc_errors(self._what):
            c = self.stub.StartChallenge(pb.ChallengeRequest(), metadata=md, timeout=CALL_TIMEOUT_S)
            solver = Solver(c.seed, c.n, c.count, target_s=c.target_s, device=device)
            commitment, done = solver.compute()
            opened = self.stub.CommitChallenge(pb.ChallengeCommit(challenge_id=c.challenge_id, commitment=commitment,
                                                                  count_done=done), metadata=md, timeout=CALL_TIMEOUT_S)
            digests, rows = solver.open(list(opened.rows))
            return self.stub.OpenChallenge(pb.ChallengeAnswer(challenge_id=c.challenge_id, row_digests=digests,
                                                              rows=rows), metadata=md, timeout=60)

    def leave(self, session: str, reason: str = "shutdown", timeout_s: float = 3.0) -> None:
        with translate_rpc_errors(self._what):
            self.stub.Leave(pb.LeaveRequest(reason=reason),
                            metadata=call_metadata(self._identity.node_id, session), timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()
