"""Node registry with liveness, persisted in SQLite.

A node is ``online`` from its registration; one whose last heartbeat is older than
``node_timeout_s`` becomes ``lost`` (:meth:`NodeRegistry.sweep`, and :meth:`snapshot` applies
the same rule so readers never see a stale ``online``); one that leaves cleanly is ``left``.
A heartbeat or a new registration brings a lost or left node back online. Times come from the
injected clock (unix seconds), so unit tests drive liveness with a FakeClock.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from swarm.clock import Clock
from swarm.errors import NotFoundError
from swarm.hardware import HardwareInfo
from swarm.membership import NodeInfo

from coordinator.store import Database

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    info: NodeInfo
    public_key: bytes
    metrics: dict[str, Any] = field(default_factory=dict)


class NodeRegistry:
    """Thread-safe registry. Readers get frozen :class:`~swarm.membership.NodeInfo` snapshots."""

    def __init__(self, db: Database, clock: Clock, *, node_timeout_s: float = 6.0) -> None:
        if node_timeout_s <= 0:
            raise ValueError("node_timeout_s must be > 0")
        self._clock = clock
        self._timeout_s = float(node_timeout_s)
        self._lock = threading.Lock()
        self._conn = db.connect()
        self._nodes: dict[str, _Entry] = {}
        self._load()

    # -- persistence -------------------------------------------------------------------------
    def _load(self) -> None:
        rows = self._conn.execute(
            "SELECT id, name, public_key, peer_address, hardware_json, state, status, metrics_json,"
            " registered_at, last_seen_at FROM nodes"
        ).fetchall()
        for row in rows:
            try:
                hw = HardwareInfo(**json.loads(row[4]))
                metrics = json.loads(row[7] or "{}")
                info = NodeInfo(
                    id=row[0], name=row[1], state=row[5], hardware=hw, peer_address=row[3],
                    status=row[6], metrics=metrics, registered_at_s=row[8], last_seen_at_s=row[9],
                )
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable node row id=%s: %s", row[0], exc)
                continue
            self._nodes[info.id] = _Entry(info=info, public_key=bytes(row[2]), metrics=metrics)
        log.info("registry loaded num_nodes=%d", len(self._nodes))

    def _save(self, entry: _Entry) -> None:
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
        self, *, node_id: str, name: str, public_key: bytes, peer_address: str, hardware: HardwareInfo
    ) -> NodeInfo:
        now = self._clock.time()
        with self._lock:
            old = self._nodes.get(node_id)
            info = NodeInfo(
                id=node_id, name=name, state="online", hardware=hardware, peer_address=peer_address,
                registered_at_s=now, last_seen_at_s=now,
                status=old.info.status if old else "", metrics=old.metrics if old else {},
            )
            entry = _Entry(info=info, public_key=public_key, metrics=info.metrics)
            self._nodes[node_id] = entry
            self._save(entry)
        log.info("node registered id=%s name=%s address=%s again=%s", node_id, name, peer_address, old is not None)
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
            if entry.info.state != "online":
                log.info("node back online id=%s name=%s", node_id, entry.info.name)
            if metrics is not None:
                entry.metrics = metrics
            entry.info = replace(
                entry.info, state="online", last_seen_at_s=now, status=status, metrics=entry.metrics, hardware=hw
            )
            self._save(entry)
            return entry.info

    def leave(self, node_id: str) -> NodeInfo:
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                raise NotFoundError(f"node {node_id} is not registered")
            entry.info = replace(entry.info, state="left", last_seen_at_s=self._clock.time())
            self._save(entry)
        log.info("node left id=%s name=%s", node_id, entry.info.name)
        return entry.info

    def sweep(self) -> list[str]:
        """Mark online nodes silent for longer than the timeout as lost; returns their ids."""
        now = self._clock.time()
        lost = []
        with self._lock:
            for entry in self._nodes.values():
                if entry.info.state == "online" and now - entry.info.last_seen_at_s > self._timeout_s:
                    entry.info = replace(entry.info, state="lost")
                    self._save(entry)
                    lost.append(entry.info.id)
        for node_id in lost:
            log.warning("node lost id=%s (no heartbeat for %.1f s)", node_id, self._timeout_s)
        return lost

    # -- reads -------------------------------------------------------------------------------
    def _effective(self, info: NodeInfo, now: float) -> NodeInfo:
        if info.state == "online" and now - info.last_seen_at_s > self._timeout_s:
            return replace(info, state="lost")
        return info

    def snapshot(self) -> tuple[NodeInfo, ...]:
        """All known nodes (any state), sorted by registration time then id."""
        now = self._clock.time()
        with self._lock:
            infos = [self._effective(e.info, now) for e in self._nodes.values()]
        return tuple(sorted(infos, key=lambda n: (n.registered_at_s, n.id)))

    def online(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.snapshot() if n.state == "online")

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

    def close(self) -> None:
        with self._lock:
            self._conn.close()
