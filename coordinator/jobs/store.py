"""Training jobs in the coordinator's SQLite file: records, state machine, progress, checkpoints.

A job moves ``pending -> running -> succeeded | failed | cancelled`` (``pending`` may also go
straight to ``failed`` or ``cancelled``); terminal states never change again. Every transition
is one UPDATE guarded by the expected old state, so two threads cannot both move a job.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from swarm.clock import Clock
from swarm.errors import InvalidRequestError, NotFoundError
from swarm.job_detail import EVENT_KINDS
from swarm.job_spec import JobSpec

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
CREATE TABLE IF NOT EXISTS job_progress (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    replica INTEGER NOT NULL,
    step INTEGER NOT NULL,
    loss REAL,
    tokens INTEGER NOT NULL,
    tokens_per_s REAL NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_raw INTEGER NOT NULL,
    step_s REAL NOT NULL,
    compute_s REAL NOT NULL,
    wait_s REAL NOT NULL,
    comm_s REAL NOT NULL,
    at REAL NOT NULL,
    bytes_forward INTEGER NOT NULL DEFAULT 0,
    bytes_backward INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt, stage, replica, step)
);
CREATE TABLE IF NOT EXISTS job_checkpoints (
    job_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    replica INTEGER NOT NULL,
    step INTEGER NOT NULL,
    final INTEGER NOT NULL,
    dir TEXT NOT NULL,
    at REAL NOT NULL,
    copy_json TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, stage, replica, step)
);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    fields_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
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


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)



def committed_resumes(fields_json: Iterable[str]) -> list[tuple[int, int]]:
    """(attempt, resume step) of each ``resumed`` event's fields; malformed ones are skipped."""
    out = []
    for text in fields_json:
        try:
            f = json.loads(text or "{}")
        except ValueError:
            continue
        if isinstance(f, dict) and isinstance(f.get("attempt"), int) and isinstance(f.get("step"), int):
            out.append((f["attempt"], f["step"]))
    return out

class JobStore:
    """Thread-safe access to the job tables (one connection guarded by a lock)."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._unreadable: set[str] = set()  # job ids whose stored spec cannot be read (warned once)
        self._conn = db.connect()
        with self._conn:
            self._conn.executescript(_SCHEMA)
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)").fetchall()}
            if "resume_step" not in cols:  # a state dir from before re-planning existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN resume_step INTEGER NOT NULL DEFAULT 0")
            if "resumed_from_json" not in cols:  # a state dir from before --resume existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN resumed_from_json TEXT NOT NULL DEFAULT ''")
            if "started_attempt" not in cols:  # a state dir from before fenced attempts existed
                self._conn.execute("ALTER TABLE jobs ADD COLUMN started_attempt INTEGER NOT NULL DEFAULT 0")
                self._conn.execute("ALTER TABLE jobs ADD COLUMN fence_json TEXT NOT NULL DEFAULT ''")
                self._conn.execute("ALTER TABLE jobs ADD COLUMN waiting_since REAL")
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(job_checkpoints)").fetchall()}
            if "copy_json" not in cols:  # a state dir from before checkpoint keepers existed
                self._conn.execute("ALTER TABLE job_checkpoints ADD COLUMN copy_json TEXT NOT NULL DEFAULT ''")

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

    def repeated_steps(self, job_id: str) -> list[int]:
        """Steps that workers of more than one attempt reported as done (work done twice)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT step FROM job_progress WHERE job_id = ? GROUP BY step, stage HAVING COUNT(DISTINCT attempt) > 1"
                " ORDER BY step", (job_id,)).fetchall()
        return sorted({r[0] for r in rows})

    def repeat_attempts(self, job_id: str) -> dict[tuple[int, int], set[int]]:
        """(step, stage) -> the attempts whose workers reported it, for those more than one did
        (:meth:`repeated_steps`; churn.split_repeats tells a rollback's redo from the rest)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT step, stage, attempt FROM job_progress WHERE job_id = ? AND (step, stage) IN (SELECT step, stage"
                " FROM job_progress WHERE job_id = ? GROUP BY step, stage HAVING COUNT(DISTINCT attempt) > 1)",
                (job_id, job_id)).fetchall()
        out: dict[tuple[int, int], set[int]] = {}
        for step, stage, attempt in rows:
            out.setdefault((int(step), int(stage)), set()).add(int(attempt))
        return out

    def set_reason(self, job_id: str, reason: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET reason = ?, updated_at = ? WHERE id = ?", (reason, self._clock.time(), job_id))

    def set_result_ready(self, job_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE jobs SET result_ready = 1 WHERE id = ?", (job_id,))

    # -- progress ------------------------------------------------------------------------------
    def add_progress(self, job_id: str, *, attempt: int, stage: int, replica: int, step: int, loss: float | None,
                     tokens: int, tokens_per_s: float, bytes_sent: int, bytes_raw: int, step_s: float,
                     compute_s: float, wait_s: float, comm_s: float, bytes_forward: int = 0,
                     bytes_backward: int = 0) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO job_progress VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, attempt, stage, replica, step, _num(loss), tokens, _num(tokens_per_s) or 0.0, bytes_sent,
                 bytes_raw, step_s, compute_s, wait_s, comm_s, self._clock.time(), bytes_forward, bytes_backward),
            )

    def worker_progressed(self, job_id: str, *, attempt: int, stage: int, replica: int) -> bool:
        """True when worker (``stage``, ``replica``) of ``attempt`` reported a step."""
        with self._lock:
            return self._conn.execute("SELECT 1 FROM job_progress WHERE job_id = ? AND attempt = ? AND stage = ? AND"
                                      " replica = ? LIMIT 1", (job_id, attempt, stage, replica)).fetchone() is not None

    def history(self, job_id: str, *, num_reporters: int, attempt: int | None = None,
                over: bool = False) -> list[dict[str, Any]]:
        """Per step: loss (mean over replicas' last stages), tokens/s, bytes, time split.

        A step of the current ``attempt`` (or of any attempt, when None) appears once
        ``num_reporters`` stage workers of it reported it. A step of an earlier attempt appears
        once every stage of that attempt reported it: its plan is over, and a fence may have run
        it with fewer pipelines than it started with (a lost replica's share). ``over``: the
        current attempt is over too (the job succeeded; a replica lost in its last steps left
        them to the others). When a re-planned job repeated steps, the latest attempt's rows count.
        A step of an earlier attempt below a later attempt's resume step appears even when a stage's
        report of it is missing: that attempt resumed from a complete checkpoint after it, so every
        stage did it (a worker killed after uploading its checkpoint, before its report got out).
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT step, attempt, AVG(loss), SUM(CASE WHEN loss IS NOT NULL THEN tokens ELSE 0 END), MAX(step_s),"
                " SUM(bytes_sent), SUM(bytes_raw), AVG(compute_s), AVG(wait_s), AVG(comm_s), COUNT(*), MAX(at),"
                " COUNT(DISTINCT stage) FROM job_progress WHERE job_id = ? GROUP BY step, attempt ORDER BY step, attempt",
                (job_id,),
            ).fetchall()
            stages_of = dict(self._conn.execute(
                "SELECT attempt, MAX(stage) + 1 FROM job_progress WHERE job_id = ? GROUP BY attempt", (job_id,)).fetchall())
            resumed = self._conn.execute("SELECT fields_json FROM job_events WHERE job_id = ? AND kind = 'resumed'",
                                         (job_id,)).fetchall()
        resumes = committed_resumes(f for (f,) in resumed)
        by_step: dict[int, dict[str, Any]] = {}
        for step, att, loss, tokens, step_s, sent, raw, comp, wait, comm, count, at, stages in rows:
            if (attempt is None or att == attempt) and not over:
                if count < num_reporters:
                    continue
            elif stages < stages_of[att] and not any(a > att and step < r for a, r in resumes):
                continue
            by_step[step] = {
                "step": step, "attempt": att, "loss": loss, "tokens": tokens, "step_s": step_s,
                "tokens_per_s": tokens / step_s if step_s else 0.0,
                "bytes_sent": sent, "bytes_saved": max(0, raw - sent), "bytes_raw": raw,
                "compute_s": comp, "wait_s": wait, "comm_s": comm, "at": at,
            }
        return [by_step[k] for k in sorted(by_step)]

    def per_worker(self, job_id: str) -> list[dict[str, Any]]:
        """The latest report of each (stage, replica)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT stage, replica, MAX(step), SUM(bytes_sent), SUM(bytes_raw), SUM(compute_s), SUM(wait_s),"
                " SUM(comm_s), SUM(step_s), SUM(bytes_forward), SUM(bytes_backward) FROM job_progress"
                " WHERE job_id = ? AND attempt = (SELECT attempt FROM jobs WHERE id = ?) GROUP BY stage, replica"
                " ORDER BY stage, replica",
                (job_id, job_id),
            ).fetchall()
        return [
            {"stage": r[0], "replica": r[1], "step": r[2], "bytes_sent": r[3], "bytes_raw": r[4],
             "compute_s": r[5], "wait_s": r[6], "comm_s": r[7], "busy_s": r[8], "bytes_forward": r[9],
             "bytes_backward": r[10]}
            for r in rows
        ]

    # -- checkpoints ---------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, *, stage: int, replica: int, step: int, final: bool, directory: str,
                       copy: dict[str, Any] | None = None) -> None:
        """``copy``: what is known of the upload apart from its files (``weights_sha256``,
        ``optimizer_sha256``, the ``keeper`` node holding a second copy, its layers), so a copy
        the coordinator's disk lost can still be found and checked."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO job_checkpoints (job_id, stage, replica, step, final, dir, at, copy_json)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (job_id, stage, replica, step, int(final), directory, self._clock.time(), json.dumps(copy or {})),
            )

    def mark_kept(self, job_id: str, *, stages: list[int], step: int) -> None:
        """Note that a second copy of the replica-0 checkpoints of ``stages`` at ``step`` is on their
        keeper (its progress report said so)."""
        with self._lock, self._conn:
            for stage in stages:
                row = self._conn.execute("SELECT copy_json FROM job_checkpoints WHERE job_id = ? AND stage = ? AND"
                                         " replica = 0 AND step = ?", (job_id, stage, step)).fetchone()
                copy = json.loads(row[0]) if row and row[0] else {}
                if copy:  # a copy with weights (the record of one without is empty)
                    copy["kept"] = True
                    self._conn.execute("UPDATE job_checkpoints SET copy_json = ? WHERE job_id = ? AND stage = ? AND"
                                       " replica = 0 AND step = ?", (json.dumps(copy), job_id, stage, step))

    def drop_checkpoints_after(self, job_id: str, step: int) -> int:
        """Forget the job's checkpoints of steps after ``step`` (a rollback past a wrong result);
        returns how many rows went."""
        with self._lock, self._conn:
            cur = self._conn.execute("DELETE FROM job_checkpoints WHERE job_id = ? AND step > ?", (job_id, step))
        return cur.rowcount

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT stage, replica, step, final, dir, at, copy_json FROM job_checkpoints WHERE job_id = ?"
                " ORDER BY step, stage, replica", (job_id,),
            ).fetchall()
        return [{"stage": r[0], "replica": r[1], "step": r[2], "final": bool(r[3]), "dir": r[4], "at": r[5],
                 "copy": json.loads(r[6]) if r[6] else {}} for r in rows]

    # -- events ----------------------------------------------------------------------------------
    def add_event(self, job_id: str, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        """Append one event (``kind`` one of :data:`swarm.job_detail.EVENT_KINDS`) and return it."""
        if kind not in EVENT_KINDS:
            raise InvalidRequestError(f"unknown job event kind {kind!r}")
        now = self._clock.time()
        with self._lock, self._conn:
            cur = self._conn.execute(
                "INSERT INTO job_events (job_id, at, kind, message, fields_json) VALUES (?,?,?,?,?)",
                (job_id, now, kind, message, json.dumps(fields, sort_keys=True)),
            )
        log.info("job event job=%s kind=%s %s", job_id, kind, message)
        return {"seq": cur.lastrowid, "at": now, "kind": kind, "message": message, "fields": fields}

    def events(self, job_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """The job's events after ``after_seq``, oldest first (at most ``limit``, the newest ones)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, at, kind, message, fields_json FROM (SELECT * FROM job_events WHERE job_id = ? AND"
                " seq > ? ORDER BY seq DESC LIMIT ?) ORDER BY seq", (job_id, after_seq, int(limit)),
            ).fetchall()
        return [{"seq": r[0], "at": r[1], "kind": r[2], "message": r[3], "fields": json.loads(r[4])} for r in rows]
