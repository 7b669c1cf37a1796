"""What the coordinator records while a job runs, in its SQLite file (:class:`JobHistory`, a part of
:class:`coordinator.jobs.store.JobStore`): workers' progress reports, checkpoint records and the job's
events.

- ``job_progress``: one row per (attempt, stage, replica, step) a worker reported; a re-sent report
  replaces its row. :meth:`JobHistory.history` turns them into per-step results, and steps that
  workers of more than one attempt reported are work done twice (:meth:`JobHistory.repeated_steps`).
- ``job_checkpoints``: one row per (stage, replica, step) upload, with what is known of the copy
  apart from its files (hashes, keeper).
- ``job_events``: the job's timeline, append-only, ``kind`` one of :data:`swarm.job_detail.EVENT_KINDS`.

The host class provides ``_conn`` (a connection of the coordinator's database), ``_lock`` (guarding
it) and ``_clock``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable

from swarm.errors import InvalidRequestError
from swarm.job_detail import EVENT_KINDS

log = logging.getLogger(__name__)

SCHEMA = """
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


def migrate(conn) -> None:
    """Add the columns a state dir from an older coordinator lacks (in the caller's transaction)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(job_checkpoints)").fetchall()}
    if "copy_json" not in cols:  # a state dir from before checkpoint keepers existed
        conn.execute("ALTER TABLE job_checkpoints ADD COLUMN copy_json TEXT NOT NULL DEFAULT ''")


class JobHistory:
    """Progress, checkpoint and event tables for :class:`~coordinator.jobs.store.JobStore`."""

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
