"""Node registry with liveness, persisted in SQLite.

A node is ``online`` from its registration; one whose last heartbeat is older than
``node_timeout_s`` becomes ``lost`` (:meth:`NodeRegistry.sweep`, and :meth:`snapshot` applies
the same rule so readers never see a stale ``online``); one that leaves cleanly is ``left``.
A heartbeat or a new registration brings a lost or left node back online.

Restarts: nodes restored from SQLite keep their state, their last-seen time is reset to the
start time, and for ``grace_s`` after the start none of them is declared lost before it is heard
from again (a node heard from since follows the usual timeout): their sessions died
with the old process and they need a moment to notice and register again. A restored node
that has not come back by the end of the grace period is lost at the next sweep. Times come from the
injected clock (unix seconds), so unit tests drive liveness with a FakeClock.

Writes: a registration, a leave and a change of state are written to SQLite at once; a
heartbeat only updates memory and marks the node dirty, and :meth:`NodeRegistry.flush` (the
coordinator's sweeper, every few seconds, and :meth:`close`) writes dirty nodes. So a heartbeat
storm is not a write storm, and a full disk never makes a heartbeating node look lost. A write
that fails for lack of space raises :class:`~swarm.errors.CapacityError` (RESOURCE_EXHAUSTED)
and leaves memory as it was. Lost and left nodes silent for ``purge_after_s`` are forgotten
(:meth:`NodeRegistry.purge`), so they stop counting against limits.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from swarm.clock import Clock
from swarm.errors import CapacityError, NotFoundError
from swarm.hardware import HardwareInfo
from swarm.membership import NodeInfo

from coordinator.store import Database
from coordinator.verification import TrustStore, measured_tflops

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    info: NodeInfo
    public_key: bytes
    metrics: dict[str, Any] = field(default_factory=dict)


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's SQLITE_FULL ("database or disk is full") and OSError ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(what: str, exc: BaseException) -> CapacityError:
    return CapacityError(f"the coordinator cannot store {what}: its disk is full ({exc}); "
                         "the operator must free space in the coordinator's --state-dir")


class NodeRegistry:
    """Thread-safe registry. Readers get frozen :class:`~swarm.membership.NodeInfo` snapshots."""

    def __init__(self, db: Database, clock: Clock, *, node_timeout_s: float = 6.0, grace_s: float = 0.0) -> None:
        if node_timeout_s <= 0 or grace_s < 0:
            raise ValueError("node_timeout_s must be > 0 and grace_s >= 0")
        self._clock = clock
        self._timeout_s = float(node_timeout_s)
        self.started_at_s = clock.time()
        self.grace_until_s = self.started_at_s + float(grace_s)
        self._grace_s = float(grace_s)
        self._restored: set[str] = set()  # loaded at start, not heard from since (see begin_grace)
        self._lock = threading.Lock()
        self._conn = db.connect()
        self._nodes: dict[str, _Entry] = {}
        self._dirty: set[str] = set()  # heartbeats not yet written (see flush)
        # measured speeds and quarantines (coordinator/verification.py); readers see them in NodeInfo
        self.trust = TrustStore(db, clock)
        self._load()

    # -- persistence -------------------------------------------------------------------------
    def _load(self) -> None:
        rows = self._conn.execute(
            "SELECT id, name, public_key, peer_address, hardware_json, state, status, metrics_json,"
            " registered_at, last_seen_at FROM nodes"
        ).fetchall()
        # The newest heartbeat the old process wrote stands for when it stopped: a node already
        # silent for longer than the timeout then was lost in its view (its reads said so even if
        # no sweep had written it), so it is restored as lost and gets no grace period.
        newest_s = max((r[9] for r in rows if r[5] == "online"), default=0.0)
        for row in rows:
            try:
                hw = HardwareInfo(**json.loads(row[4]))
                metrics = json.loads(row[7] or "{}")
                state = row[5]
                if state == "online" and newest_s - row[9] > self._timeout_s:
                    state = "lost"
                # last seen: at the latest, now (the old process heard of it; see the module doc)
                info = NodeInfo(
                    id=row[0], name=row[1], state=state, hardware=hw, peer_address=row[3],
                    status=row[6], metrics=metrics, registered_at_s=row[8],
                    last_seen_at_s=max(row[9], self.started_at_s) if state == "online" else row[9],
                )
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable node row id=%s: %s", row[0], exc)
                continue
            self._nodes[info.id] = _Entry(info=info, public_key=bytes(row[2]), metrics=metrics)
            if info.state == "online":
                self._restored.add(info.id)
        log.info("registry loaded num_nodes=%d", len(self._nodes))

    def _save(self, entry: _Entry) -> None:
        """Write one node now. Raises CapacityError when the disk is full."""
        try:
            self._write(entry)
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc):
                raise disk_full_error(f"node {entry.info.id}", exc) from exc
            raise
        self._dirty.discard(entry.info.id)

    def _write(self, entry: _Entry) -> None:
        info = entry.info
        with self._conn:
            self._conn.execute(
                "INSERT INTO nodes (id, name, public_key, peer_address, hardware_json, state, status,"
                " metrics_json, registered_at, last_seen_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET name=excluded.name, public_key=excluded.public_key,"
                " peer_address=excluded.peer_address, hardware_json=excluded.hardware_json,"
                " state=excluded.state, status=excluded.status, metrics_json=excluded.metrics_json,"
                " registered_at=excluded.registered_at, last_seen_at=excluded.last_seen_at",
                (
                    info.id, info.name, entry.public_key, info.peer_address,
                    json.dumps(asdict(info.hardware)), info.state, info.status,
                    json.dumps(entry.metrics, default=str), info.registered_at_s, info.last_seen_at_s,
                ),
            )

    # -- mutations ---------------------------------------------------------------------------
    def register(
        self, *, node_id: str, name: str, public_key: bytes, peer_address: str, hardware: HardwareInfo,
        reachability: str = "direct", relay_address: str = "",
    ) -> NodeInfo:
        """``reachability="pending"`` (the servicer): not :meth:`online` until :meth:`set_reachability`
        records the coordinator's dial-back; ``relay_address``: the node offers relaying there."""
        now = self._clock.time()
        with self._lock:
            old = self._nodes.get(node_id)
            info = NodeInfo(
                id=node_id, name=name, state="online", hardware=hardware, peer_address=peer_address,
                registered_at_s=now, last_seen_at_s=now,
                status=old.info.status if old else "", metrics=old.metrics if old else {},
                reachability=reachability, advertised_address=peer_address, relay_address=relay_address,
            )
            entry = _Entry(info=info, public_key=public_key, metrics=info.metrics)
            self._save(entry)  # first: a full disk refuses the registration and changes nothing
            self._nodes[node_id] = entry
            self._restored.discard(node_id)
        log.info("node registered id=%s name=%s address=%s again=%s", node_id, name, peer_address, old is not None)
        return info

    def set_reachability(self, node_id: str, *, reachability: str, published_address: str, observed_address: str,
                         relay_node_id: str = "") -> NodeInfo:
        """Record the dial-back's decision (swarm/reachability.py): peers dial ``published_address``
        from now on. Written at once (the address peers get is state worth keeping)."""
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered; register first")
            entry.info = replace(entry.info, reachability=reachability, peer_address=published_address,
                                 observed_address=observed_address, relay_node_id=relay_node_id)
            self._flush_one(entry)
            info = entry.info
        log.info("node reachability id=%s %s published=%s observed=%s relay=%s", node_id, reachability,
                 published_address, observed_address, relay_node_id or "-")
        return info

    def heartbeat(
        self, node_id: str, *, status: str = "", metrics: dict[str, Any] | None = None,
        memory_free_bytes: int | None = None,
    ) -> NodeInfo:
        """Record a heartbeat; raises NotFoundError for an unknown node."""
        now = self._clock.time()
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered; register first")
            hw = entry.info.hardware
            if memory_free_bytes is not None and 0 <= memory_free_bytes <= hw.memory_bytes:
                hw = replace(hw, memory_free_bytes=int(memory_free_bytes))
            self._restored.discard(node_id)
            came_back = entry.info.state != "online"
            if came_back:
                log.info("node back online id=%s name=%s", node_id, entry.info.name)
            if metrics is not None:
                entry.metrics = metrics
            entry.info = replace(
                entry.info, state="online", last_seen_at_s=now, status=status, metrics=entry.metrics, hardware=hw
            )
            self._dirty.add(node_id)
            if came_back:  # a change of state is written now; if the disk is full, at the next flush
                self._flush_one(entry)
            return entry.info

    def leave(self, node_id: str) -> NodeInfo:
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered")
            left = replace(entry.info, state="left", last_seen_at_s=self._clock.time())
            self._save(_Entry(info=left, public_key=entry.public_key, metrics=entry.metrics))
            entry.info = left
        log.info("node left id=%s name=%s", node_id, entry.info.name)
        return entry.info

    def sweep(self) -> list[str]:
        """Mark online nodes silent for longer than the timeout as lost; returns their ids."""
        now = self._clock.time()
        lost: list[str] = []
        with self._lock:
            for entry in self._nodes.values():
                if entry.info.state == "online" and now - entry.info.last_seen_at_s > self._timeout_s and \
                        not self._graced(entry.info.id, now):
                    entry.info = replace(entry.info, state="lost")
                    self._dirty.add(entry.info.id)
                    self._flush_one(entry)
                    lost.append(entry.info.id)
        for node_id in lost:
            log.warning("node lost id=%s (no heartbeat for %.1f s)", node_id, self._timeout_s)
        return lost

    def _flush_one(self, entry: _Entry) -> bool:
        try:
            self._save(entry)
            return True
        except CapacityError as exc:
            log.warning("node state kept in memory only for now: %s", exc)
            return False

    def flush(self) -> int:
        """Write the nodes changed by heartbeats since the last flush; returns how many were
        written. A full disk is logged and retried at the next flush, never raised."""
        with self._lock:
            entries = [self._nodes[i] for i in list(self._dirty) if i in self._nodes]
            written = 0
            for entry in entries:
                if not self._flush_one(entry):
                    break
                written += 1
        return written

    def purge(self, older_than_s: float) -> list[str]:
        """Forget lost and left nodes last seen more than ``older_than_s`` ago; returns their ids."""
        now = self._clock.time()
        with self._lock:
            gone = [e.info.id for e in self._nodes.values()
                    if self._effective(e.info, now).state in ("lost", "left") and now - e.info.last_seen_at_s > older_than_s]
            if not gone:
                return []
            try:
                with self._conn:
                    self._conn.executemany("DELETE FROM nodes WHERE id = ?", [(i,) for i in gone])
            except (sqlite3.Error, OSError) as exc:
                log.warning("could not purge %d old nodes (retried at the next sweep): %s", len(gone), exc)
                return []
            for node_id in gone:
                del self._nodes[node_id]
                self._dirty.discard(node_id)
        log.info("forgot %d nodes lost or left more than %.0f s ago", len(gone), older_than_s)
        return gone

    # -- reads -------------------------------------------------------------------------------
    def begin_grace(self) -> None:
        """Start the grace period now (the coordinator serves from now on): restored online nodes
        count as seen now, and none is declared lost for ``grace_s``."""
        now = self._clock.time()
        with self._lock:
            self.started_at_s = now
            self.grace_until_s = now + self._grace_s
            for entry in self._nodes.values():
                if entry.info.state == "online" and entry.info.last_seen_at_s < now:
                    entry.info = replace(entry.info, last_seen_at_s=now)
        if self._nodes:
            log.info("grace period of %.1f s: %d known node(s) may re-register before any is declared lost",
                     self._grace_s, len(self._nodes))

    def in_grace(self, now: float | None = None) -> bool:
        """True during the grace period after the start (restored nodes are not declared lost)."""
        return (self._clock.time() if now is None else now) < self.grace_until_s

    def _graced(self, node_id: str, now: float) -> bool:
        return node_id in self._restored and now < self.grace_until_s

    def _effective(self, info: NodeInfo, now: float) -> NodeInfo:
        rec = self.trust.get(info.id)
        if rec.quarantine_reason:  # no new work, whatever its liveness
            info = replace(info, state="quarantined", quarantine_reason=rec.quarantine_reason)
        elif info.state == "online" and now - info.last_seen_at_s > self._timeout_s and not self._graced(info.id, now):
            info = replace(info, state="lost")
        slow = self.trust.slow_reason(info.id)
        if slow:
            info = replace(info, slow_reason=slow)
        seen_bw = self.trust.seen_mem_bandwidth(info.id)
        if seen_bw is not None:
            info = replace(info, seen_mem_bandwidth_Bps=seen_bw)
        measured = measured_tflops(rec.challenge_tflops, rec.observed_tflops)
        return info if measured is None else replace(info, measured_tflops=measured)

    def snapshot(self) -> tuple[NodeInfo, ...]:
        """All known nodes (any state), sorted by registration time then id."""
        now = self._clock.time()
        with self._lock:
            infos = [self._effective(e.info, now) for e in self._nodes.values()]
        return tuple(sorted(infos, key=lambda n: (n.registered_at_s, n.id)))

    def online(self) -> tuple[NodeInfo, ...]:
        """Online nodes peers may be sent to: a node whose dial-back is pending is left out."""
        return tuple(n for n in self.snapshot() if n.state == "online" and n.reachability != "pending")

    def get(self, node_id: str) -> NodeInfo:
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered")
            return self._effective(entry.info, self._clock.time())

    def public_key(self, node_id: str) -> bytes:
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered")
            return entry.public_key

    def quarantine(self, node_id: str, reason: str) -> bool:
        """Quarantine a node (state ``quarantined``: no new work); False when it already was."""
        return self.trust.quarantine(node_id, reason)

    def close(self) -> None:
        self.sweep()  # what reads already showed as lost is written as lost (a restart keeps it)
        self.flush()
        with self._lock:
            self._conn.close()
        self.trust.close()
