"""CPU seconds of a tree of processes (a local swarm's coordinator, nodes and their children), from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def tree_cpu_s(roots: list[int]) -> float:
    """utime + stime + cutime + cstime of ``roots`` and their live descendants, from /proc."""
    stats: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stats[int(d.name)] = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[1]), []).append(pid)  # f[1]: ppid (field 4)
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        f = stats[pid]
        total += sum(int(v) for v in f[11:15])  # utime stime cutime cstime (fields 14-17)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")
