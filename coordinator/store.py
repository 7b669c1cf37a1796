"""The coordinator's SQLite database (``state_dir/coordinator.sqlite3``).

Any component may open its own connection with :meth:`Database.connect` and create its own
tables (``CREATE TABLE IF NOT EXISTS`` on start): connections are in WAL mode with a busy
timeout, so several threads and connections share the file safely. Use one connection per
thread, or guard a shared one with a lock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

DB_FILE = "coordinator.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_key BLOB NOT NULL,
    peer_address TEXT NOT NULL,
    hardware_json TEXT NOT NULL,
    state TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '',
    metrics_json TEXT NOT NULL DEFAULT '{}',
    registered_at REAL NOT NULL,
    last_seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS links (
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    delay_s REAL NOT NULL,
    rtt_s REAL NOT NULL,
    bandwidth_Bps REAL NOT NULL,
    measured_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'probe',
    PRIMARY KEY (src, dst)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Database:
    """The coordinator's SQLite file. ``db_path`` for others; ``connect()`` for a new connection."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / DB_FILE
        with self.connect() as conn:
            conn.executescript(_SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """A new connection (WAL, 30 s busy timeout, usable from any one thread at a time)."""
        conn = sqlite3.connect(self.db_path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
