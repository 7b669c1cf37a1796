"""State at rest: private permissions, and a damaged database stops start-up cleanly.

Real processes: a coordinator and a node run briefly, then every file in both state dirs must
be 0600 and every directory 0700 (also one that was world-readable before start). A coordinator
started on an empty, corrupt or foreign database exits with code 2 and says what to do.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.store import DB_FILE, Database
from tests.helpers.procs import child_env, coordinator_proc, node_proc, require_online, wait_until


def _modes(root: Path) -> dict[str, str]:
    out = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = oct(stat.S_IMODE(p.lstat().st_mode))
    return out


def test_state_dirs_are_private(tmp_path):
    coord_dir, node_dir = tmp_path / "coord", tmp_path / "n0"
    (coord_dir / "old").mkdir(parents=True, mode=0o755)
    (coord_dir / "old" / "notes.txt").write_text("from an older version")
    os.chmod(coord_dir / "old" / "notes.txt", 0o644)
    with coordinator_proc(coord_dir) as coord, node_proc(coord, node_dir):
        wait_until(lambda: require_online(coord.snapshot(), 1, full_matrix=False), timeout_s=30, message="node online")
        for root in (coord_dir, node_dir):
            modes = _modes(root)
            assert len(modes) > 1
            bad = {name: mode for name, mode in modes.items()
                   if mode != ("0o700" if (root / name).is_dir() else "0o600")}
            assert not bad, f"not private in {root.name}: {bad}"
        names = set(_modes(coord_dir))
        assert {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", "join_token"} <= names
        assert "identity.key" in _modes(node_dir)


def _serve(state_dir: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
            "--state-dir", str(state_dir)]
    return subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=60)


def _good_state(state_dir: Path) -> Path:
    Database(state_dir)
    gc.collect()  # close its connection now: a later close would checkpoint over the damage
    (state_dir / "join_token").write_text("t" * 32 + "\n")
    return state_dir / DB_FILE


def _empty(db: Path) -> None:
    db.write_bytes(b"")


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(8192))


def _corrupt_pages(db: Path) -> None:
    with sqlite3.connect(db) as conn:  # fold the WAL in, so the pages live in the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    for page in range(4096, len(data), 4096):  # damage the b-tree header of every page after the first
        for i in range(page, page + 8):
            data[i] ^= 0x5A
    db.write_bytes(bytes(data))


def _foreign(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE something_else (x)")


@pytest.mark.parametrize("damage", [_empty, _garbage, _corrupt_pages, _foreign])
def test_damaged_database_stops_start_up_with_advice(tmp_path, damage):
    db = _good_state(tmp_path / "coord")
    damage(db)
    before = db.read_bytes()
    result = _serve(tmp_path / "coord")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "READY" not in result.stdout
    assert "restore" in result.stderr and "move it aside" in result.stderr, result.stderr[-2000:]
    assert db.read_bytes() == before  # nothing was "repaired" by starting fresh
