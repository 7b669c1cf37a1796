"""Training jobs in the coordinator's SQLite file: records and their state machine (the tables
written while a job runs, progress, checkpoints and events: coordinator/jobs/store_history.py).

A job moves ``pending -> running -> succeeded | failed | cancelled`` (``pending`` may also go
straight to ``failed`` or ``cancelled``); terminal states never change again. Every transition
is one UPDATE guarded by the expected old state, so two threads cannot both move a job.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from swarm.clock import Clock
from swarm.errors import InvalidRequestError, NotFoundError
from swarm.job_spec import JobSpec

from coordinator.jobs import store_history
from coordinator.jobs.store_history import JobHistory
from coordinator.store import Database

log = logging.getLogger(__name__)

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_ALLOWED = {
    "pending": {"running", "failed", "cancelled"},
    "running": {"succeeded", "failed", "cancelled", "pending"},
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    spec_json TEXT NOT NULL,
    model_json TEXT NOT NULL DEFAULT '{}',
    plan_json TEXT NOT NULL DEFAULT '',
    assignments_json TEXT NOT NULL DEFAULT '[]',
    attempt INTEGER NOT NULL DEFAULT 0,
    num_samples INTEGER NOT NULL DEFAULT 0,
    dataset_key TEXT NOT NULL DEFAULT '',
    total_steps INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result_ready INTEGER NOT NULL DEFAULT 0,
    resume_step INTEGER NOT NULL DEFAULT 0,
    resumed_from_json TEXT NOT NULL DEFAULT '',
    started_attempt INTEGER NOT NULL DEFAULT 0,
    fence_json TEXT NOT NULL DEFAULT '',
    waiting_since REAL
);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    id: str
    state: str
    reason: str
    spec: JobSpec
    model: dict[str, Any]
    plan: dict[str, Any] | None
    assignments: list[dict[str, Any]] = field(default_factory=list)
    attempt: int = 0
    num_samples: int = 0
    dataset_key: str = ""
    total_steps: int = 0
    created_at_s: float = 0.0
    updated_at_s: float = 0.0
    started_at_s: float | None = None
    finished_at_s: float | None = None
    result_ready: bool = False
    resume_step: int = 0
    resumed_from: dict[str, Any] | None = None  # {"job_id", "step"} of a job started with --resume
    started_attempt: int = 0  # the latest attempt every worker acknowledged (told to start)
    fence: dict[str, Any] | None = None  # a replica-loss fence in progress (coordinator/jobs/churn.py)
    waiting_since_s: float | None = None  # pending again after losing a stage: since when

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


_COLS = (
    "id, state, reason, spec_json, model_json, plan_json, assignments_json, attempt, num_samples, dataset_key,"
    " total_steps, created_at, updated_at, started_at, finished_at, result_ready, resume_step,"
    " resumed_from_json, started_attempt, fence_json, waiting_since"
)


def _spec(job_id: str, spec_json: str) -> JobSpec:
    """The stored spec: :meth:`JobSpec.to_json`, or the plain dict of coordinators before JobSpec
    existed (the same keys, missing ones take today's defaults)."""
    try:
        return JobSpec.from_json(spec_json)
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            f"job {job_id} has an unreadable spec in the coordinator's database ({exc}); the job "
            "is skipped: submit it again with `swarm train`"
        ) from None


def _job(row) -> Job:
    return Job(
        id=row[0], state=row[1], reason=row[2], spec=_spec(row[0], row[3]), model=json.loads(row[4]),
        plan=json.loads(row[5]) if row[5] else None, assignments=json.loads(row[6]), attempt=row[7],
        num_samples=row[8], dataset_key=row[9], total_steps=row[10], created_at_s=row[11], updated_at_s=row[12],
        started_at_s=row[13], finished_at_s=row[14], result_ready=bool(row[15]), resume_step=row[16],
        resumed_from=json.loads(row[17]) if row[17] else None, started_attempt=row[18],
        fence=json.loads(row[19]) if row[19] else None, waiting_since_s=row[20],
    )


class JobStore(JobHistory):
    """Thread-safe access to the job tables (one connection guarded by a lock)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._unreadable: set[str] = set()  # job ids whose stored spec cannot be read (warned once)
        self._conn = db.connect()
        with self._conn:
            self._conn.executescript(_SCHEMA + store_history.SCHEMA)
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)").fetchall()}
            if "resume_step" not in cols:  # a state dir from before re-planning existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN resume_step INTEGER NOT NULL DEFAULT 0")
            if "resumed_from_json" not in cols:  # a state dir from before --resume existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN resumed_from_json TEXT NOT NULL DEFAULT ''")
            if "started_attempt" not in cols:  # a state dir from before fenced attempts existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN started_attempt INTEGER NOT NULL DEFAULT 0")
                self._conn.execute("ALTER TABLE jobs ADD COLUMN fence_json TEXT NOT NULL DEFAULT ''")
                self._conn.execute("ALTER TABLE jobs ADD COLUMN waiting_since REAL")
            store_history.migrate(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs ----------------------------------------------------------------------------------
    def create(self, *, job_id: str, spec: JobSpec, model: dict[str, Any], num_samples: int,
               dataset_key: str, total_steps: int, resumed_from: dict[str, Any] | None = None) -> Job:
        """A new ``pending`` job; ``resumed_from`` ({"job_id", "step"}) starts it at that step."""
        now = self._clock.time()
        resume_step = int(resumed_from["step"]) if resumed_from else 0
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO jobs (id, state, spec_json, model_json, num_samples, dataset_key, total_steps,"
                " created_at, updated_at, resume_step, resumed_from_json) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, "pending", spec.to_json(), json.dumps(model), num_samples, dataset_key, total_steps, now, now,
                 resume_step, json.dumps(resumed_from) if resumed_from else ""),
            )
        log.info("job created job=%s steps=%d samples=%d", job_id, total_steps, num_samples)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; `swarm jobs` lists the jobs")
        return _job(row)

    def list(self, *, limit: int = 100, states: tuple[str, ...] | None = None) -> list[Job]:
        q = f"SELECT {_COLS} FROM jobs"
        args: list[Any] = []
        if states:
            q += " WHERE state IN (%s)" % ",".join("?" * len(states))
            args += list(states)
        q += " ORDER BY created_at DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            rows = self._conn.execute(q, args).fetchall()
        out = []
        for r in rows:
            try:
                out.append(_job(r))
            except InvalidRequestError as exc:  # one bad row must not hide the other jobs
                if r[0] not in self._unreadable:
                    self._unreadable.add(r[0])
                    log.warning("skipping job job=%s: %s", r[0], exc)
        return out

    def transition(self, job_id: str, new_state: str, *, reason: str = "", expect: str | None = None,
                   **fields: Any) -> Job | None:
        """Move a job to ``new_state``; returns the updated job, or None when it was not allowed
        (already terminal, or not in ``expect``). ``fields``: plan, assignments, attempt, resume_step."""
        if new_state not in STATES:
            raise InvalidRequestError(f"unknown job state {new_state!r}")
        now = self._clock.time()
        with self._lock, self._conn:
            row = self._conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            old = row[0]
            if (expect is not None and old != expect) or new_state not in _ALLOWED.get(old, set()):
                return None
            sets = ["state = ?", "reason = ?", "updated_at = ?"]
            args: list[Any] = [new_state, reason, now]
            if "plan" in fields:
                sets.append("plan_json = ?")
                args.append(json.dumps(fields["plan"]) if fields["plan"] is not None else "")
            if "assignments" in fields:
                sets.append("assignments_json = ?")
                args.append(json.dumps(fields["assignments"]))
            if "attempt" in fields:
                sets.append("attempt = ?")
                args.append(int(fields["attempt"]))
            if "resume_step" in fields:
                sets.append("resume_step = ?")
                args.append(int(fields["resume_step"]))
            # any move clears a fence; only a move back to pending starts a wait
            sets += ["fence_json = ''", "waiting_since = ?"]
            args.append(now if new_state == "pending" and old == "running" else None)
            if new_state == "running":
                sets.append("started_at = COALESCE(started_at, ?)")
                args.append(now)
            if new_state in TERMINAL:
                sets.append("finished_at = ?")
                args.append(now)
            self._conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
        log.info("job state job=%s %s -> %s reason=%s", job_id, old, new_state, reason or "-")
        return self.get(job_id)

    def replan(self, job_id: str, *, plan: dict[str, Any], assignments: list[dict[str, Any]], attempt: int,
               resume_step: int, reason: str, expect_attempt: int) -> Job | None:
        """Give a running job a new plan (attempt) that resumes after ``resume_step``; None when
        the job is no longer running at ``expect_attempt``."""
        with self._lock, self._conn:
            cur = self._conn.execute(
                "UPDATE jobs SET plan_json = ?, assignments_json = ?, attempt = ?, resume_step = ?, reason = ?,"
                " updated_at = ?, fence_json = '' WHERE id = ? AND state = 'running' AND attempt = ?",
                (json.dumps(plan), json.dumps(assignments), attempt, resume_step, reason, self._clock.time(), job_id,
                 expect_attempt),
            )
            if cur.rowcount != 1:
                return None
        log.info("job re-planned job=%s attempt=%d resume_step=%d reason=%s", job_id, attempt, resume_step, reason)
        return self.get(job_id)

    def set_started(self, job_id: str, attempt: int) -> None:
        """Every worker of ``attempt`` acknowledged it: it may start (kept across restarts)."""
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET started_attempt = MAX(started_attempt, ?) WHERE id = ?",
                               (int(attempt), job_id))

    def set_fence(self, job_id: str, fence: dict[str, Any] | None, *, expect_attempt: int) -> bool:
        """Store (or clear, None) the job's fence while it runs at ``expect_attempt``; False otherwise."""
        with self._lock, self._conn:
            cur = self._conn.execute(
                "UPDATE jobs SET fence_json = ? WHERE id = ? AND state = 'running' AND attempt = ?",
                (json.dumps(fence, sort_keys=True) if fence else "", job_id, int(expect_attempt)))
            return cur.rowcount == 1

    def set_reason(self, job_id: str, reason: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET reason = ?, updated_at = ? WHERE id = ?", (reason, self._clock.time(), job_id))

    def set_result_ready(self, job_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET result_ready = 1 WHERE id = ?", (job_id,))

