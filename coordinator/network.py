"""Measured links between nodes: storage, matrices, and which pairs to measure next.

:class:`NetworkStore` keeps the latest :class:`~swarm.membership.Link` per directed pair
(persisted in SQLite) and builds matrices for the planners::

    delay_s, bandwidth_Bps, measured_at = app.network.matrix(node_ids)

Row i, column j is the link from node_ids[i] to node_ids[j]; unmeasured entries are NaN, the
diagonal is delay 0 and bandwidth +inf. Other components record what they observe from real
transfers with :meth:`NetworkStore.record` (``source="transfer"``).

:class:`MeasurementScheduler` hands out measurement tasks on heartbeats: each node takes part
in at most one measurement at a time (as source or destination), so probes never share a
link; missing links go first, then the stalest beyond ``remeasure_interval_s``. Up to
``max_full_mesh_nodes`` online nodes every ordered pair is measured; beyond, each source
measures a seeded sample of ``sample_peers`` peers per re-measure period.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from swarm.clock import Clock
from swarm.membership import Link, NodeInfo, link_paths

from coordinator.store import Database

log = logging.getLogger(__name__)


class NetworkMatrix(NamedTuple):
    delay_s: np.ndarray  # (N, N) one-way delay estimate, seconds
    bandwidth_Bps: np.ndarray  # (N, N) bytes per second
    measured_at: np.ndarray  # (N, N) unix seconds, NaN when never measured


def transfer_link(existing: Link | None, observations: list[tuple[int, float]], now_s: float) -> Link | None:
    """The link to record after real transfers over ``existing`` (``(num_bytes, seconds)`` each), or None.

    A push's time is the sender's wall time of the whole call (the receiver reassembles,
    validates and decodes before it answers), so bytes / seconds is a LOWER BOUND of the link's
    bandwidth. The rule: take the max of the observations (the tightest lower bound) and let it
    only RAISE the known bandwidth, whatever the known link's source or age -- a fresher probe
    is never overwritten by a lower transfer-derived number. Lowering a link stays the job of
    the periodic probes (a raised link is re-probed ``remeasure_interval_s`` after the raise).
    Delay and RTT are kept from the existing link; with no link yet (no probe) there is no
    delay to keep and nothing is recorded: the scheduler probes missing links first anyway.
    """
    if existing is None or not observations:
        return None
    bandwidth = max(num_bytes / seconds for num_bytes, seconds in observations)
    if not (math.isfinite(bandwidth) and bandwidth > existing.bandwidth_Bps):
        return None
    return Link(src=existing.src, dst=existing.dst, delay_s=existing.delay_s, rtt_s=existing.rtt_s,
                bandwidth_Bps=bandwidth, measured_at_s=now_s, source="transfer")


PROBE_TOLERANCE = 0.25  # the two ends of an honest probe report the same timing (the sender
# computes its figure from the receiver's reply); 25% leaves room for the sender-timed fallback


def probe_agreement(sender_Bps: float, receiver_Bps: float | None) -> tuple[float, bool, bool]:
    """(bandwidth to keep, confirmed, disputed) from what the two ends of a probe reported. Pure.

    No receipt from the receiver: the sender's figure, unconfirmed. Within PROBE_TOLERANCE
    (relative to the larger): confirmed, the lower kept. Beyond: disputed, the lower kept."""
    if receiver_Bps is None or not (math.isfinite(receiver_Bps) and receiver_Bps > 0):
        return sender_Bps, False, False
    low, high = sorted((sender_Bps, receiver_Bps))
    return low, (high - low) <= PROBE_TOLERANCE * high, (high - low) > PROBE_TOLERANCE * high


def bound_transfer(existing: Link | None, proposed: Link | None) -> Link | None:
    """A transfer-derived link only over a link both ends confirmed (a source caught inflating a
    probe gets no say through its transfers either); it keeps the confirmation flag off."""
    if proposed is None or existing is None or existing.disputed or not existing.confirmed:
        return None
    return proposed


@dataclass(slots=True)
class _ProbeHalf:
    src: str
    dst: str
    issued_s: float
    sender: tuple[float, float] | None = None  # (rtt_s, bandwidth_Bps) from ReportMeasurement
    receiver_Bps: float | None = None  # from the receiver's ProbeReceipt
    receipt_seen: bool = False


class ProbeBook:
    """Pairs each probe's sender report with the receiver's receipt (both ends measure a link).

    ``expect(task)`` when the task is handed out; ``sender_report`` / ``receipt`` as they come,
    in any order; each returns the Link to record once both arrived (or None). ``expired``
    returns sender-only links (unconfirmed) whose receipt never came within ``wait_s``."""

    def __init__(self, clock: Clock, *, wait_s: float = 10.0) -> None:
        self._clock = clock
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._tasks: dict[str, _ProbeHalf] = {}

    def expect(self, task_id: str, src: str, dst: str) -> None:
        with self._lock:
            self._tasks[task_id] = _ProbeHalf(src=src, dst=dst, issued_s=self._clock.time())

    def sender_report(self, task_id: str, rtt_s: float, bandwidth_Bps: float) -> Link | None:
        with self._lock:
            half = self._tasks.get(task_id)
            if half is None:
                return None
            half.sender = (rtt_s, bandwidth_Bps)
            return self._done(task_id, half)

    def receipt(self, reporter: str, task_id: str, timed_bytes: int, first_to_last_s: float) -> Link | None:
        """A receiver's receipt; ignored unless ``reporter`` is the task's destination."""
        with self._lock:
            half = self._tasks.get(task_id)
            if half is None or half.dst != reporter or half.receipt_seen:
                return None
            half.receipt_seen = True
            if timed_bytes > 0 and first_to_last_s > 0:
                half.receiver_Bps = timed_bytes / first_to_last_s
            return self._done(task_id, half)

    def _done(self, task_id: str, half: _ProbeHalf) -> Link | None:
        if half.sender is None or not half.receipt_seen:
            return None
        del self._tasks[task_id]
        return self._link(half)

    def _link(self, half: _ProbeHalf) -> Link:
        rtt, sender_bw = half.sender
        bw, confirmed, disputed = probe_agreement(sender_bw, half.receiver_Bps)
        if disputed:
            log.warning("probe ends disagree src=%s dst=%s sender_MBps=%.1f receiver_MBps=%.1f (keeping the lower)",
                        half.src[:8], half.dst[:8], sender_bw / 1e6, (half.receiver_Bps or 0) / 1e6)
        return Link(src=half.src, dst=half.dst, delay_s=rtt / 2, rtt_s=rtt, bandwidth_Bps=bw,
                    measured_at_s=self._clock.time(), source="probe", confirmed=confirmed, disputed=disputed)

    def expired(self) -> list[Link]:
        now = self._clock.time()
        out = []
        with self._lock:
            for task_id, half in list(self._tasks.items()):
                if now - half.issued_s <= self.wait_s:
                    continue
                del self._tasks[task_id]
                if half.sender is not None:
                    out.append(self._link(half))
        return out


def relay_capped(bandwidth_Bps: np.ndarray, nodes: list[NodeInfo], caps_Bps: dict[str, float]) -> np.ndarray:
    """The relay's own capacity as a planning constraint. Pure.

    Links INTO a node reached through relay R (path ``relayed``, swarm/reachability.py) all cross
    R, so they share its cap: each is priced at most cap_R / (the number of ``nodes`` R relays),
    the share each gets when all of them receive at once (a pipeline's stages do). Measured
    bandwidth below that stays as measured; unmeasured links (NaN) stay unmeasured; relays of
    unknown capacity (volunteers do not report theirs yet) leave links as measured."""
    path = link_paths(nodes)
    load = Counter(n.relay_node_id for n in nodes if n.reachability == "relayed" and n.relay_node_id)
    out = np.array(bandwidth_Bps, dtype=float, copy=True)
    for j, dst in enumerate(nodes):
        cap = caps_Bps.get(dst.relay_node_id) if dst.reachability == "relayed" else None
        if cap is None:
            continue
        share = cap / load[dst.relay_node_id]
        for i, src in enumerate(nodes):
            if i != j and path(src.id, dst.id) == "relayed" and math.isfinite(out[i, j]):
                out[i, j] = min(out[i, j], share)
    return out


class NetworkStore:
    """Latest link per (src, dst); thread-safe. ``relay_caps``: bytes/s of each relay whose
    capacity is known (the coordinator's own), for :meth:`planning_matrix`."""

    def __init__(self, db: Database) -> None:
        self.relay_caps: dict[str, float] = {}
        self._lock = threading.Lock()
        self._conn = db.connect()
        self._links: dict[tuple[str, str], Link] = {}
        for row in self._conn.execute(
            "SELECT src, dst, delay_s, rtt_s, bandwidth_Bps, measured_at, source FROM links"
        ).fetchall():
            try:
                link = Link(src=row[0], dst=row[1], delay_s=row[2], rtt_s=row[3], bandwidth_Bps=row[4],
                            measured_at_s=row[5], source=row[6])
            except ValueError as exc:
                log.warning("skipping unreadable link row %s->%s: %s", row[0], row[1], exc)
                continue
            self._links[(link.src, link.dst)] = link

    def record(self, link: Link) -> None:
        with self._lock:
            self._links[(link.src, link.dst)] = link
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO links (src, dst, delay_s, rtt_s, bandwidth_Bps, measured_at, source)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (link.src, link.dst, link.delay_s, link.rtt_s, link.bandwidth_Bps, link.measured_at_s, link.source),
                )
        log.info("link measured src=%s dst=%s rtt_ms=%.2f bandwidth_Mbps=%.1f source=%s",
                 link.src[:8], link.dst[:8], link.rtt_s * 1e3, link.bandwidth_Bps * 8 / 1e6, link.source)

    def get(self, src: str, dst: str) -> Link | None:
        with self._lock:
            return self._links.get((src, dst))

    def links(self, node_ids: list[str] | None = None) -> tuple[Link, ...]:
        """All links, or those among ``node_ids``; sorted by (src, dst)."""
        with self._lock:
            links = list(self._links.values())
        if node_ids is not None:
            keep = set(node_ids)
            links = [link for link in links if link.src in keep and link.dst in keep]
        return tuple(sorted(links, key=lambda link: (link.src, link.dst)))

    def matrix(self, node_ids: list[str]) -> NetworkMatrix:
        n = len(node_ids)
        delay = np.full((n, n), np.nan)
        bandwidth = np.full((n, n), np.nan)
        measured = np.full((n, n), np.nan)
        np.fill_diagonal(delay, 0.0)
        np.fill_diagonal(bandwidth, np.inf)
        with self._lock:
            for i, src in enumerate(node_ids):
                for j, dst in enumerate(node_ids):
                    link = self._links.get((src, dst))
                    if i != j and link is not None:
                        delay[i, j] = link.delay_s
                        bandwidth[i, j] = link.bandwidth_Bps
                        measured[i, j] = link.measured_at_s
        return NetworkMatrix(delay, bandwidth, measured)

    def planning_matrix(self, nodes: list[NodeInfo]) -> NetworkMatrix:
        """:meth:`matrix` over ``nodes`` with relayed links priced within their relay's capacity
        (:func:`relay_capped`): what planners use."""
        m = self.matrix([n.id for n in nodes])
        return NetworkMatrix(m.delay_s, relay_capped(m.bandwidth_Bps, list(nodes), self.relay_caps), m.measured_at)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasureTask:
    task_id: str
    src: str
    dst: str
    dst_address: str
    probe_bytes: int
    num_pings: int
    deadline_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementPolicy:
    remeasure_interval_s: float = 300.0
    retry_after_failure_s: float = 10.0
    task_timeout_s: float = 30.0
    probe_bytes: int = 4 << 20
    num_pings: int = 5
    max_full_mesh_nodes: int = 32
    sample_peers: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.remeasure_interval_s <= 0 or self.task_timeout_s <= 0 or self.retry_after_failure_s < 0:
            raise ValueError("measurement intervals must be > 0")
        if not 1 << 10 <= self.probe_bytes <= 1 << 30:
            raise ValueError("probe_bytes must be in 1 KiB..1 GiB")
        if not 1 <= self.num_pings <= 100:
            raise ValueError("num_pings must be in 1..100")
        if self.max_full_mesh_nodes < 2 or self.sample_peers < 1:
            raise ValueError("max_full_mesh_nodes must be >= 2 and sample_peers >= 1")


def candidate_peers(src: str, others: list[str], policy: MeasurementPolicy, now_s: float) -> list[str]:
    """Peers ``src`` should keep measured: all of them in a small swarm, else a seeded sample
    that changes every re-measure period. Pure and deterministic."""
    others = sorted(o for o in others if o != src)
    if len(others) + 1 <= policy.max_full_mesh_nodes:
        return others
    epoch = int(now_s // policy.remeasure_interval_s)
    digest = hashlib.sha256(f"{policy.seed}:{src}:{epoch}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(others, min(policy.sample_peers, len(others)))


class MeasurementScheduler:
    """Assigns link measurements to nodes as they heartbeat; thread-safe."""

    def __init__(self, store: NetworkStore, clock: Clock, policy: MeasurementPolicy) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy
        self._lock = threading.Lock()
        self._in_flight: dict[str, MeasureTask] = {}
        self._failed_at: dict[tuple[str, str], float] = {}

    def _expire(self, now: float) -> None:
        for task_id, task in list(self._in_flight.items()):
            if now > task.deadline_s:
                log.warning("measurement timed out src=%s dst=%s", task.src[:8], task.dst[:8])
                self._failed_at[(task.src, task.dst)] = now
                del self._in_flight[task_id]

    def _busy(self) -> set[str]:
        busy = set()
        for task in self._in_flight.values():
            busy.add(task.src)
            busy.add(task.dst)
        return busy

    def next_task(self, src: str, online: tuple[NodeInfo, ...]) -> MeasureTask | None:
        """The measurement ``src`` should run now, or None."""
        now = self._clock.time()
        by_id = {n.id: n for n in online}
        if src not in by_id:
            return None
        p = self.policy
        with self._lock:
            self._expire(now)
            busy = self._busy()
            if src in busy:
                return None
            best: tuple[float, str] | None = None
            for dst in candidate_peers(src, list(by_id), p, now):
                if dst in busy:
                    continue
                failed = self._failed_at.get((src, dst))
                if failed is not None and now - failed < p.retry_after_failure_s:
                    continue
                link = self._store.get(src, dst)
                age = math.inf if link is None else now - link.measured_at_s
                if age < p.remeasure_interval_s:
                    continue
                key = (-age, dst)  # missing (infinite age) first, then stalest; ties by id
                if best is None or key < best:
                    best = key
            if best is None:
                return None
            dst = best[1]
            task = MeasureTask(
                task_id=secrets.token_hex(8), src=src, dst=dst, dst_address=by_id[dst].peer_address,
                probe_bytes=p.probe_bytes, num_pings=p.num_pings, deadline_s=now + p.task_timeout_s,
            )
            self._in_flight[task.task_id] = task
            return task

    def probe_sources(self, dst: str) -> list[str]:
        """The nodes holding a measurement task towards ``dst`` now (only they may probe it)."""
        with self._lock:
            return sorted({t.src for t in self._in_flight.values() if t.dst == dst})

    def complete(self, task_id: str, src: str, *, failed: bool) -> MeasureTask | None:
        """Close the task ``task_id`` run by ``src``; None when there is no such task."""
        with self._lock:
            task = self._in_flight.get(task_id)
            if task is None or task.src != src:
                return None
            del self._in_flight[task_id]
            if failed:
                self._failed_at[(task.src, task.dst)] = self._clock.time()
            else:
                self._failed_at.pop((task.src, task.dst), None)
            return task

    def forget(self, node_id: str) -> None:
        """Drop the tasks a departed node takes part in."""
        with self._lock:
            for task_id, task in list(self._in_flight.items()):
                if node_id in (task.src, task.dst):
                    del self._in_flight[task_id]
