"""Shared helpers for benchmarks: print a table and append it to docs/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DOC = REPO_ROOT / "docs" / "benchmarks.md"


def machine_description() -> str:
    """CPU model and core count, plus the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # torch missing or broken: the CPU description is still right
        pass
    return desc


def git_commit() -> str:
    """The checkout's commit; ``$SWARM_COMMIT`` wins (a copy of the tree run elsewhere, such as
    the GPU machine, carries stale git metadata)."""
    if os.environ.get("SWARM_COMMIT"):
        return os.environ["SWARM_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SWARM_COMMIT", "unknown")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, table: str, notes: str = "", *, doc: Path | None = None) -> None:
    """Append a section with machine, date and commit to docs/benchmarks.md."""
    doc = doc or BENCH_DOC
    doc.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"\n## {title}\n\n"
        f"- machine: {machine_description()}\n- date: {stamp}\n- commit: {git_commit()}\n\n"
        f"{table}\n"
    )
    if notes:
        section += f"\n{notes.strip()}\n"
    if not doc.exists():
        doc.write_text("# Benchmark results\n\nEach section is appended by a script under `bench/`.\n")
    with doc.open("a") as f:
        f.write(section)
