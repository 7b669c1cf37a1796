"""The coordinator's SQLite database (``state_dir/coordinator.sqlite3``).

Any component may open its own connection with :meth:`Database.connect` and create its own
tables (``CREATE TABLE IF NOT EXISTS`` on start): connections are in WAL mode with a busy
timeout, so several threads and connections share the file safely. Use one connection per
thread, or guard a shared one with a lock.

At start the file is checked before anything uses it (:func:`check_database`): a file that is
empty, corrupt (``PRAGMA quick_check``) or lacks the schema stops start-up with
:class:`StateCorruptError` saying what to do, instead of a traceback or a silently fresh
registry. A missing file is a fresh start (that is what "move the file aside" asks for), logged
as a warning when the state dir holds other state. The state dir is made private at start
(files 0600, directories 0700, see :mod:`swarm.statedir`).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from swarm.errors import ConfigError
from swarm.statedir import FILE_MODE, create_private_file, secure_state_dir

log = logging.getLogger(__name__)

DB_FILE = "coordinator.sqlite3"
REQUIRED_TABLES = ("nodes", "links", "meta")


class StateCorruptError(ConfigError):
    """The state dir's database cannot be used; the message says how to recover."""


def _recovery(path: Path) -> str:
    return (f"restore {path.name} from a backup, or move it aside (mv {path} {path}.bad) to start with an "
            "empty registry (nodes register again by themselves; jobs and models recorded in it are forgotten)")


def check_database(path: Path) -> bool:
    """Check an existing database file; returns False if there is none. Raises StateCorruptError."""
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_file():
        raise StateCorruptError(f"{path} is not a file; {_recovery(path)}")
    if path.stat().st_size == 0:
        raise StateCorruptError(f"the coordinator's database {path} is empty (0 bytes); {_recovery(path)}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30.0)
        try:
            result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StateCorruptError(f"the coordinator's database {path} cannot be read ({exc}); {_recovery(path)}") from exc
    if result != ["ok"]:
        raise StateCorruptError(f"the coordinator's database {path} is corrupt (integrity check: "
                                f"{'; '.join(map(str, result[:3]))[:300]}); {_recovery(path)}")
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise StateCorruptError(f"the coordinator's database {path} has no {', '.join(missing)} table(s), so it is "
                                f"not this coordinator's state; {_recovery(path)}")
    return True

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
        secure_state_dir(self.state_dir)
        self.db_path = self.state_dir / DB_FILE
        if not check_database(self.db_path):
            others = [p.name for p in self.state_dir.iterdir() if not p.name.startswith(DB_FILE)]
            if others:
                log.warning("no database at %s although the state dir holds %s: starting with an empty registry",
                            self.db_path, ", ".join(sorted(others)[:5]))
            create_private_file(self.db_path)  # SQLite gives -wal and -shm the mode of the database file
        with self.connect() as conn:
            conn.executescript(_SCHEMA)
        for suffix in ("", "-wal", "-shm"):
            f = self.db_path.with_name(DB_FILE + suffix)
            if f.exists():
                f.chmod(FILE_MODE)

    def connect(self) -> sqlite3.Connection:
        """A new connection (WAL, 30 s busy timeout, usable from any one thread at a time)."""
        conn = sqlite3.connect(self.db_path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn
