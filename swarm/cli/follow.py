"""Following a training job: the progress bar, the job's events as they happen, reconnection.

:class:`FollowPrinter` decides what to print from each job detail it is shown (pure: it writes
to the stream it was given, tests drive it with ``io.StringIO``); :func:`follow` is the polling
loop around it. Events print one line each, ``!`` for what went wrong or changed the plan
(``! node ab12 (stage 1, replica 0) is lost``, ``! re-planning ...: resuming from step 10``),
``*`` for the rest. When the coordinator stops answering the loop says so, retries with
exponential backoff (0.5 s doubling to 10 s) and prints ``reconnected`` when it answers again.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from swarm.errors import UnavailableError

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
GIVE_UP_S = 3600.0  # a coordinator gone this long is not coming back for this follow


def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def progress_line(job: dict, width: int = 24) -> str:
    total = job.get("total_steps") or 0
    step = job.get("step")
    done = 0 if step is None else step + 1
    filled = int(width * done / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    line = (f"[{bar}] step {done}/{total}  loss {_num(job.get('loss'), '.4f')}  "
            f"tok/s {_num(job.get('tokens_per_s'), '.0f')}  ETA {_fmt_s(job.get('eta_s'))}  {job['state']}")
    if job["state"] == "pending" and job.get("reason"):
        line += f" ({job['reason']})"  # e.g. waiting for nodes
    return line


def event_line(event: dict) -> str:
    """One event as the follow loop prints it."""
    from swarm.job_detail import WARNING_EVENT_KINDS

    mark = "!" if event.get("kind") in WARNING_EVENT_KINDS else "*"
    return f"{mark} {event.get('message', event.get('kind', '?'))}"


class FollowPrinter:
    """Prints a job's new events and its progress bar (redrawn in place on a terminal)."""

    def __init__(self, out: TextIO, *, tty: bool, quiet: bool = False) -> None:
        self.out = out
        self.tty = tty
        self.quiet = quiet
        self._last_seq = 0
        self._last_bar: tuple | None = None
        self._bar_open = False  # a bar line without its newline is on the terminal

    def _line(self, text: str) -> None:
        if self._bar_open:
            self.out.write("\n")
            self._bar_open = False
        self.out.write(text + "\n")
        self.out.flush()

    def show(self, detail: dict) -> None:
        """Print what is new in ``detail`` (a ``swarm job --json`` object)."""
        if self.quiet:
            return
        for ev in detail.get("events") or []:
            if ev.get("seq", 0) > self._last_seq:
                self._last_seq = ev["seq"]
                self._line(event_line(ev))
                self._last_bar = None  # redraw the bar under the event
        key = (detail.get("step"), detail["state"], detail.get("reason"))
        if key != self._last_bar:
            self._last_bar = key
            if self.tty:
                self.out.write("\r" + progress_line(detail))
                self.out.flush()
                self._bar_open = True
            else:
                self._line(progress_line(detail))

    def lost(self, exc: BaseException, retry_s: float) -> None:
        if not self.quiet:
            self._line(f"! lost the coordinator ({exc}); retrying in {retry_s:.1f} s")

    def reconnected(self) -> None:
        if not self.quiet:
            self._line("* reconnected to the coordinator")

    def close(self) -> None:
        if self._bar_open:
            self.out.write("\n")
            self.out.flush()
            self._bar_open = False


def follow(client, job_id: str, *, quiet: bool, interval_s: float = 1.0, out: TextIO | None = None,
           sleep=time.sleep, clock=time.monotonic, give_up_s: float = GIVE_UP_S):
    """Poll until the job ends, printing its events and a bar line per new step (unless
    ``quiet``); returns its JobRecord. Survives the coordinator going away for up to
    ``give_up_s`` (then raises the last UnavailableError)."""
    out = sys.stdout if out is None else out
    printer = FollowPrinter(out, tty=out.isatty(), quiet=quiet)
    retry_s, lost_since = RETRY_MIN_S, None
    try:
        while True:
            try:
                job = client.get_job(job_id)
            except UnavailableError as exc:
                now = clock()
                if lost_since is None:
                    lost_since = now
                    printer.lost(exc, retry_s)
                elif now - lost_since > give_up_s:
                    raise
                sleep(retry_s)
                retry_s = min(RETRY_MAX_S, retry_s * 2)
                continue
            if lost_since is not None:
                printer.reconnected()
                lost_since, retry_s = None, RETRY_MIN_S
            printer.show(job.detail)
            if job.terminal:
                return job
            sleep(interval_s)
    finally:
        printer.close()
