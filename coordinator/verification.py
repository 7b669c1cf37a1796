"""Trust but verify: measured speeds, compute challenges, quarantine (docs/security.md, "Verification").

:class:`TrustStore` keeps, per node, what the coordinator measured rather than what the node
claimed (persisted in SQLite table ``trust``):

- ``challenge_tflops``: the result of the compute challenge at join (:class:`Challenges`,
  :mod:`swarm.challenge`);
- ``observed_tflops``: a running estimate from real training steps, computed from the step times
  reported by the node's NEIGHBOURS (:func:`observed_tflops`), never from its own report;
- ``quarantine``: the reason a node was quarantined (wrong results, stalling); a quarantined
  node gets no new work (the registry shows it as state ``quarantined``).

:func:`swarm.membership.effective_tflops` is the one rule the planner and the plan preview use
(through ``NodeInfo.planning_tflops``): a claim more than ``CLAIM_SLACK`` (2) x above what was
measured (:func:`measured_tflops`) is replaced by the measurement.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from dataclasses import dataclass

from swarm import challenge
from swarm.clock import Clock
from swarm.membership import CLAIM_SLACK, effective_tflops  # noqa: F401 -- the rule lives in swarm
from swarm.errors import InvalidRequestError, PermissionDeniedError

log = logging.getLogger(__name__)

OBSERVED_EMA = 0.3  # weight of a new step-time observation in the running estimate
CHALLENGE_TARGET_S = 0.25
CHALLENGE_TIMEOUT_S = 120.0
NUM_OPEN_ROWS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trust (
    node_id TEXT PRIMARY KEY,
    challenge_tflops REAL,
    observed_tflops REAL,
    quarantine_reason TEXT NOT NULL DEFAULT '',
    quarantined_at REAL
);
CREATE TABLE IF NOT EXISTS mem_bandwidth_seen (
    node_id TEXT PRIMARY KEY,
    seen_Bps REAL NOT NULL
);
"""
SEEN_WRITE_STEP = 1.1  # a higher seen bandwidth is written to SQLite when 10% over the stored one (not every step)


def measured_tflops(challenge_tflops: float | None, observed_tflops: float | None) -> float | None:
    """What the coordinator saw: the lower of the challenge and the running estimate."""
    seen = [v for v in (challenge_tflops, observed_tflops) if v is not None and v > 0]
    return min(seen) if seen else None


def observed_tflops(stage_flops: float, neighbour_step_s: float) -> float | None:
    """A node's speed as seen from outside: its stage's FLOPs per step over the pipeline step
    time its neighbour reported (the neighbour waits for it, so a slow node shows up there).
    A lower bound of the node's real speed; None when there is nothing to go on."""
    if not (stage_flops > 0 and math.isfinite(neighbour_step_s) and neighbour_step_s > 0):
        return None
    return stage_flops / neighbour_step_s / 1e12


@dataclass(frozen=True, slots=True)
class TrustRecord:
    challenge_tflops: float | None = None
    observed_tflops: float | None = None
    quarantine_reason: str = ""
    quarantined_at_s: float | None = None


class TrustStore:
    """Thread-safe; one row per node that was measured or quarantined."""

    def __init__(self, db, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._conn = db.connect()
        with self._conn:
            self._conn.executescript(_SCHEMA)
        self._rows: dict[str, TrustRecord] = {}
        self._slow: dict[str, str] = {}  # node -> why its neighbours see it slow (speed.py), in memory
        for node_id, ct, ot, reason, at in self._conn.execute(
                "SELECT node_id, challenge_tflops, observed_tflops, quarantine_reason, quarantined_at FROM trust"):
            self._rows[node_id] = TrustRecord(ct, ot, reason or "", at)
        self._seen_bw: dict[str, float] = {}  # node -> the highest memory bandwidth its decode steps showed
        self._seen_bw_stored: dict[str, float] = {}
        for node_id, bw in self._conn.execute("SELECT node_id, seen_Bps FROM mem_bandwidth_seen"):
            self._seen_bw[node_id] = self._seen_bw_stored[node_id] = float(bw)

    def mark_slow(self, node_id: str, reason: str) -> None:
        """Why the node's neighbours see it slow ("" = they no longer do); kept in memory only."""
        with self._lock:
            if reason:
                self._slow[node_id] = reason[:1000]
            else:
                self._slow.pop(node_id, None)

    def slow_reason(self, node_id: str) -> str:
        with self._lock:
            return self._slow.get(node_id, "")

    def get(self, node_id: str) -> TrustRecord:
        with self._lock:
            return self._rows.get(node_id, TrustRecord())

    def _put(self, node_id: str, rec: TrustRecord) -> None:
        self._rows[node_id] = rec
        try:
            with self._conn:
                self._conn.execute(
                    "INSERT OR REPLACE INTO trust (node_id, challenge_tflops, observed_tflops, quarantine_reason,"
                    " quarantined_at) VALUES (?,?,?,?,?)",
                    (node_id, rec.challenge_tflops, rec.observed_tflops, rec.quarantine_reason, rec.quarantined_at_s))
        except Exception as exc:  # noqa: BLE001 -- memory stays right; the row is written next time
            log.warning("could not write trust record of %s: %s", node_id[:12], exc)

    def set_challenge(self, node_id: str, tflops: float) -> None:
        with self._lock:
            old = self._rows.get(node_id, TrustRecord())
            self._put(node_id, TrustRecord(tflops, old.observed_tflops, old.quarantine_reason, old.quarantined_at_s))
        log.info("compute challenge passed node=%s measured_tflops=%.4f", node_id[:12], tflops)

    def observe(self, node_id: str, tflops: float) -> float:
        """Fold one step-time observation into the running estimate; returns the new estimate."""
        with self._lock:
            old = self._rows.get(node_id, TrustRecord())
            prev = old.observed_tflops
            new = tflops if prev is None else (1 - OBSERVED_EMA) * prev + OBSERVED_EMA * tflops
            self._rows[node_id] = TrustRecord(old.challenge_tflops, new, old.quarantine_reason, old.quarantined_at_s)
            return new

    def observe_mem_bandwidth(self, node_id: str, seen_Bps: float) -> None:
        """One decode step's lower bound of the node's memory bandwidth (bytes/s,
        swarm.scheduling.disaggregation.seen_stage_bandwidths): the highest one is kept, since
        each proves the node at least that fast (a neighbour that forges a stage time slower than
        it was cannot lower it). Persisted, in steps of SEEN_WRITE_STEP."""
        if not (math.isfinite(seen_Bps) and seen_Bps > 0):
            return
        with self._lock:
            if seen_Bps <= self._seen_bw.get(node_id, 0.0):
                return
            self._seen_bw[node_id] = seen_Bps
            if seen_Bps < SEEN_WRITE_STEP * self._seen_bw_stored.get(node_id, 0.0):
                return
            self._seen_bw_stored[node_id] = seen_Bps
            try:
                with self._conn:
                    self._conn.execute("INSERT OR REPLACE INTO mem_bandwidth_seen (node_id, seen_Bps) VALUES (?,?)",
                                       (node_id, seen_Bps))
            except Exception as exc:  # noqa: BLE001 -- memory stays right; a later step writes it
                log.warning("could not write seen memory bandwidth of %s: %s", node_id[:12], exc)

    def seen_mem_bandwidth(self, node_id: str) -> float | None:
        """The highest memory bandwidth the node's decode steps showed (bytes/s); None: none seen."""
        with self._lock:
            return self._seen_bw.get(node_id)

    def quarantine(self, node_id: str, reason: str) -> bool:
        """Quarantine ``node_id``; returns False when it already was."""
        with self._lock:
            old = self._rows.get(node_id, TrustRecord())
            if old.quarantine_reason:
                return False
            self._put(node_id, TrustRecord(old.challenge_tflops, old.observed_tflops, reason[:500], self._clock.time()))
        log.warning("node quarantined node=%s reason=%s", node_id[:12], reason)
        return True

    def release(self, node_id: str) -> None:
        """Lift a quarantine (an operator's decision)."""
        with self._lock:
            old = self._rows.get(node_id, TrustRecord())
            self._put(node_id, TrustRecord(old.challenge_tflops, old.observed_tflops, "", None))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(slots=True)
class _Pending:
    node_id: str
    seed: int
    n: int
    count: int
    started_s: float
    commitment: bytes = b""
    count_done: int = 0
    elapsed_s: float = 0.0
    rows: tuple[int, ...] = ()


class Challenges:
    """The coordinator's side of the compute challenge (protocol: :mod:`swarm.challenge`).

    ``start`` -> ``commit`` (the clock stops here) -> ``open`` (rows chosen after the commitment
    are checked; on success the TrustStore gets ``challenge_tflops``). One challenge per node at
    a time; times from the injected clock's monotonic time."""

    def __init__(self, trust: TrustStore, clock: Clock, *, rng: secrets.SystemRandom | None = None) -> None:
        self.trust = trust
        self._clock = clock
        self._rng = rng or secrets.SystemRandom()
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def start(self, node_id: str, device_kind: str) -> tuple[str, int, int, int, float]:
        """(challenge_id, seed, n, count, target_s) for ``node_id``."""
        n = challenge.size_for(device_kind)
        cid = secrets.token_hex(8)
        p = _Pending(node_id=node_id, seed=self._rng.randrange(1 << 40), n=n, count=challenge.MAX_COUNT,
                     started_s=self._clock.monotonic())
        with self._lock:
            for k in [k for k, v in self._pending.items() if v.node_id == node_id]:
                del self._pending[k]
            self._pending[cid] = p
        return cid, p.seed, p.n, p.count, CHALLENGE_TARGET_S

    def _get(self, node_id: str, cid: str) -> _Pending:
        with self._lock:
            p = self._pending.get(cid)
        if p is None or p.node_id != node_id:
            raise InvalidRequestError("no such compute challenge for this node (it may have expired); start again")
        if self._clock.monotonic() - p.started_s > CHALLENGE_TIMEOUT_S:
            with self._lock:
                self._pending.pop(cid, None)
            raise PermissionDeniedError("the compute challenge took too long; start again")
        return p

    def commit(self, node_id: str, cid: str, commitment: bytes, count_done: int) -> list[int]:
        """Stop the clock; returns the flat row indices to open."""
        p = self._get(node_id, cid)
        if p.commitment:
            raise InvalidRequestError("this challenge was already committed")
        if len(commitment) != 32 or not 1 <= count_done <= p.count:
            raise InvalidRequestError(f"a commitment is 32 bytes and count_done in 1..{p.count}")
        p.elapsed_s = max(self._clock.monotonic() - p.started_s, 1e-6)
        p.commitment, p.count_done = bytes(commitment), int(count_done)
        p.rows = tuple(self._rng.randrange(p.count_done * p.n) for _ in range(NUM_OPEN_ROWS))
        return list(p.rows)

    def open(self, node_id: str, cid: str, row_digests: bytes, rows: bytes) -> tuple[bool, float, str]:
        """Check the opened rows; returns (passed, measured_tflops, message)."""
        p = self._get(node_id, cid)
        if not p.commitment:
            raise InvalidRequestError("commit before opening the challenge")
        with self._lock:
            self._pending.pop(cid, None)
        why = challenge.check_answer(seed=p.seed, n=p.n, count=p.count_done, commitment=p.commitment,
                                     rows=list(p.rows), row_digests=row_digests, row_bytes=rows)
        if why:
            self.trust.quarantine(node_id, f"failed the compute challenge: {why}")
            return False, 0.0, why
        tflops = p.count_done * 2.0 * p.n ** 3 / p.elapsed_s / 1e12
        self.trust.set_challenge(node_id, tflops)
        return True, tflops, ""
