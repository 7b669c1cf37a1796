"""Who may register, how often, and with which address: the coordinator's admission rules.

Protocol (checked by the Register servicer after the token and the signature):

- **Replay**: every signed registration carries a nonce; the nonces of the last
  ``2 * max_clock_skew_s`` are kept in SQLite (``registration_nonces``), so a registration
  captured before a coordinator restart is refused after it, as before it. Older ones need
  not be kept: their timestamp is outside the accepted skew.
- **Per join token**: at most ``max_identities_per_token`` node identities are known under
  one token (``node_tokens`` remembers which token admitted which node id), and at most
  ``max_new_identities_per_min`` new ones are admitted per minute. A known identity
  registering again (after a coordinator restart, say) is neither limited nor counted again.
  The registry forgets lost and left nodes after ``lost_node_ttl_s``; :meth:`Admission.forget`
  then frees their place.
- **Addresses**: the advertised peer address must not be link-local (169.254.0.0/16 and
  fe80::/10, where cloud metadata services live), unspecified or multicast; must not be the
  coordinator's own gRPC or HTTP port on one of its own addresses; and must not be the address
  of another online node. Host names are compared as text (not resolved: a blocking DNS lookup
  per registration would be its own denial of service).

Refusals raise swarm errors: AuthError (replay), CapacityError (limits, full disk),
InvalidRequestError (address), each saying what to do.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from swarm.clock import Clock
from swarm.errors import AuthError, CapacityError, ConfigError, InvalidRequestError
from swarm.membership import NodeInfo
from swarm.transport.channels import parse_address

from coordinator.registry import disk_full_error, is_disk_full
from coordinator.store import Database

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registration_nonces (
    nonce BLOB PRIMARY KEY,
    seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS registration_nonces_seen_at ON registration_nonces (seen_at);
CREATE TABLE IF NOT EXISTS node_tokens (
    node_id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL
);
"""
_PRUNE_EVERY_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionPolicy:
    """Limits on registrations (flags of ``swarm-coordinator serve``)."""

    max_identities_per_token: int = 5_000
    max_new_identities_per_min: int = 600
    lost_node_ttl_s: float = 3600.0  # lost or left nodes are forgotten after this long

    def __post_init__(self) -> None:
        if self.max_identities_per_token < 1:
            raise ConfigError("--max-identities-per-token must be >= 1")
        if self.max_new_identities_per_min < 1:
            raise ConfigError("--max-new-identities-per-min must be >= 1")
        if not self.lost_node_ttl_s > 0:
            raise ConfigError("--lost-node-ttl-s must be > 0")


def token_id(token: str) -> str:
    """A stable, non-secret name for a token (the token itself is not stored twice)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (canonical host, port): IPs in compressed form, names lower-cased."""
    host, port = parse_address(address)
    ip = _ip(host)
    return (str(ip) if ip is not None else host.lower().rstrip(".")), port


def local_hosts(bind_host: str) -> set[str]:
    """The names and addresses under which this machine may be reached (best effort, no DNS)."""
    hosts = {"localhost", "0.0.0.0", "::", bind_host.lower()}
    try:
        name = socket.gethostname()
        hosts.add(name.lower())
        for info in socket.getaddrinfo(name, None):  # /etc/hosts on most machines
            hosts.add(str(_ip(info[4][0]) or info[4][0]))
    except OSError:
        pass
    return hosts


class Admission:
    """Thread-safe. ``own_ports``/``own_hosts`` are set by the app once its servers are bound."""

    def __init__(self, db: Database, clock: Clock, policy: AdmissionPolicy, *, max_clock_skew_s: float) -> None:
        self.policy = policy
        self._clock = clock
        self._keep_s = 2 * max_clock_skew_s
        self._lock = threading.Lock()
        self._conn = db.connect()
        with self._conn:
            self._conn.executescript(_SCHEMA)
        self._token_of: dict[str, str] = dict(self._conn.execute("SELECT node_id, token_id FROM node_tokens"))
        self._recent: dict[str, deque[float]] = {}
        self._last_prune = float("-inf")
        self.own_ports: set[int] = set()
        self.own_hosts: set[str] = set()

    # -- replay --------------------------------------------------------------------------------
    def check_nonce(self, nonce: bytes) -> None:
        """Refuse a nonce seen in the last ``2 * max_clock_skew_s``, across restarts."""
        now = self._clock.time()
        with self._lock:
            try:
                with self._conn:
                    if now - self._last_prune > _PRUNE_EVERY_S:
                        self._conn.execute("DELETE FROM registration_nonces WHERE seen_at < ?", (now - self._keep_s,))
                        self._last_prune = now
                    self._conn.execute("INSERT INTO registration_nonces (nonce, seen_at) VALUES (?, ?)",
                                       (bytes(nonce), now))
            except sqlite3.IntegrityError:
                raise AuthError("this registration was already used (replay); the node must sign a fresh one") from None
            except (sqlite3.Error, OSError) as exc:
                if is_disk_full(exc):
                    raise disk_full_error("a registration", exc) from exc
                raise

    # -- identities per token ------------------------------------------------------------------
    def admit_identity(self, token: str, node_id: str) -> None:
        """Count ``node_id`` under ``token``; raises CapacityError over a limit. Idempotent."""
        tid = token_id(token)
        now = self._clock.time()
        p = self.policy
        with self._lock:
            if node_id in self._token_of:
                return
            num = sum(1 for t in self._token_of.values() if t == tid)
            if num >= p.max_identities_per_token:
                raise CapacityError(
                    f"this join token already has {num} node identities (--max-identities-per-token "
                    f"{p.max_identities_per_token}); identities of nodes lost for {p.lost_node_ttl_s:.0f} s are freed, "
                    "or ask the coordinator's operator to raise the limit")
            recent = self._recent.setdefault(tid, deque())
            while recent and now - recent[0] > 60.0:
                recent.popleft()
            if len(recent) >= p.max_new_identities_per_min:
                raise CapacityError(
                    f"this join token registered {len(recent)} new node identities in the last minute "
                    f"(--max-new-identities-per-min {p.max_new_identities_per_min}); retry in a minute")
            try:
                with self._conn:
                    self._conn.execute("INSERT OR REPLACE INTO node_tokens (node_id, token_id) VALUES (?, ?)",
                                       (node_id, tid))
            except (sqlite3.Error, OSError) as exc:
                if is_disk_full(exc):
                    raise disk_full_error("a new node identity", exc) from exc
                raise
            recent.append(now)
            self._token_of[node_id] = tid

    def forget(self, node_ids: Iterable[str]) -> None:
        """Free the places of purged nodes."""
        ids = [i for i in node_ids]
        if not ids:
            return
        with self._lock:
            try:
                with self._conn:
                    self._conn.executemany("DELETE FROM node_tokens WHERE node_id = ?", [(i,) for i in ids])
            except (sqlite3.Error, OSError) as exc:
                log.warning("could not forget %d node identities (retried later): %s", len(ids), exc)
                return
            for i in ids:
                self._token_of.pop(i, None)

    def num_identities(self, token: str) -> int:
        tid = token_id(token)
        with self._lock:
            return sum(1 for t in self._token_of.values() if t == tid)

    # -- addresses -------------------------------------------------------------------------------
    def check_peer_address(self, address: str, node_id: str, online: Iterable[NodeInfo]) -> None:
        """Refuse addresses nobody should dial (see the module docstring)."""
        host, port = normalize_address(address)
        ip = _ip(host)
        if ip is not None and (ip.is_link_local or ip.is_unspecified or ip.is_multicast):
            raise InvalidRequestError(
                f"peer address {address!r} is link-local, unspecified or multicast and cannot be advertised; "
                "pass the node's reachable address with --advertise-host")
        own = port in self.own_ports and (host in self.own_hosts or (ip is not None and ip.is_loopback))
        if own:
            raise InvalidRequestError(
                f"peer address {address!r} is this coordinator's own port; advertise the node's peer port")
        holder = self.held_by_other(address, node_id, online)
        if holder is not None:
            raise InvalidRequestError(
                f"peer address {address!r} is held by another online node ({holder[:8]}); "
                "advertise this node's own address (--advertise-host, --port), or wait until that node is lost")

    @staticmethod
    def held_by_other(address: str, node_id: str, online: Iterable[NodeInfo]) -> str | None:
        """The id of another online node whose published address is ``address``, else None. Nodes
        whose dial-back is pending hold no address yet (two NAT'd nodes may advertise the same
        private one); the dial-back checks again before publishing (issue 11)."""
        host, port = normalize_address(address)
        for n in online:
            if n.id == node_id or n.state != "online" or n.reachability == "pending":
                continue
            try:
                theirs = normalize_address(n.peer_address)
            except (ValueError, InvalidRequestError):
                continue
            if theirs == (host, port):
                return n.id
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
