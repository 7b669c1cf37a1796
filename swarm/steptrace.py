"""Per-step timestamps of the inference hot path, for profiling a chain (off unless asked for).

With ``SWARM_STEP_TRACE=DIR`` in its environment, a process appends one JSON line per inference
step to ``DIR/<role>-<pid>.jsonl``: ``{"key": [session id, start position], "stage": S, "model":
M, "entries": N, marks}``
where each mark is a ``time.perf_counter()`` reading (CLOCK_MONOTONIC: comparable between
processes on one host). The coordinator's driver marks ``send`` / ``reply`` around its step; a
stage marks ``in`` (message taken from the stream), ``parsed`` (hidden states decoded),
``computed`` (its layers done, the device synchronised: tracing adds that one sync),
``packed`` (the message to the next stage built), ``back`` (the next stage's reply received)
and ``out`` (reply handed back). The key (first entry's session and position) names the same
step in every process. ``bench/inference.py --trace`` turns the files into a per-hop table.

The trace is a diagnostic of one's own machines: it writes session ids, never tokens or tensors.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

_ENV = "SWARM_STEP_TRACE"


class StepTrace:
    """Appends marked steps as JSON lines; ``enabled`` is False when the variable is unset."""

    def __init__(self, role: str, directory: str | None = None) -> None:
        directory = os.environ.get(_ENV, "") if directory is None else directory
        self.enabled = bool(directory)
        self._lock = threading.Lock()
        self._file = None
        if self.enabled:
            path = Path(directory)
            try:
                path.mkdir(parents=True, exist_ok=True)
                self._file = open(path / f"{role}-{os.getpid()}.jsonl", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            except OSError as exc:  # a diagnostic never stops the process
                logging.getLogger(__name__).warning("%s=%s: cannot write step traces there (%s); tracing is off",
                                                    _ENV, directory, exc)
                self.enabled = False

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def write(self, key: tuple[str, int], stage: int, marks: dict[str, float], *, model: str, entries: int) -> None:
        if self._file is None:
            return
        line = json.dumps({"key": [key[0], int(key[1])], "stage": stage, "model": model, "entries": entries, **marks})
        with self._lock:
            self._file.write(line + "\n")


def read_traces(directory: Path) -> list[dict]:
    """Every traced record under ``directory`` (role from the file name)."""
    out = []
    for f in sorted(Path(directory).glob("*.jsonl")):
        role = f.name.split("-", 1)[0]
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append({"role": role, **json.loads(line)})
    return out


def hop_breakdown(records: list[dict], num_stages: int) -> dict[str, list[float]]:
    """Per traced step whose every process wrote a record, the milliseconds of each segment of
    its round trip: ``coord->s0``, ``s{k} parse``, ``s{k} compute``, ``s{k} pack``,
    ``s{k}->s{k+1}`` (down), ``s{k+1}->s{k}`` (the reply back up), ``s0->coord``, and ``total``."""
    by_key: dict[tuple, dict] = {}
    for r in records:
        k = (r["key"][0], r["key"][1])
        slot = "coord" if r["role"] == "coordinator" else r["stage"]
        by_key.setdefault(k, {})[slot] = r
    out: dict[str, list[float]] = {}

    def add(name: str, value_s: float) -> None:
        out.setdefault(name, []).append(value_s * 1e3)

    for recs in by_key.values():
        if "coord" not in recs or any(s not in recs for s in range(num_stages)):
            continue
        c = recs["coord"]
        add("coord->s0", recs[0]["in"] - c["send"])
        for s in range(num_stages):
            r = recs[s]
            add(f"s{s} parse", r["parsed"] - r["in"])
            add(f"s{s} compute", r["computed"] - r["parsed"])
            if s + 1 < num_stages:
                nxt = recs[s + 1]
                add(f"s{s} pack", r["packed"] - r["computed"])
                add(f"s{s}->s{s + 1}", nxt["in"] - r["packed"])
                add(f"s{s + 1}->s{s}", r["back"] - nxt["out"])
                add(f"s{s} reply", r["out"] - r["back"])
            else:
                add(f"s{s} sample", r["out"] - r["computed"])
        add("s0->coord", c["reply"] - recs[0]["out"])
        add("total", c["reply"] - c["send"])
    return out
