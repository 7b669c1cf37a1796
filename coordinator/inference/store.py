"""Served models on the coordinator: uploaded checkpoints on disk and their records in SQLite.

Files live in ``state_dir/models/<name>/<digest[:16]>/``; the ``inference_models`` table keeps
name, digest, directory, serving parameters and state, so a restarted coordinator knows what
it served. Uploads are streamed, bounded (file count, per-file and total size, free disk),
and checked against the SHA-256 the client announced before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from swarm.errors import CapacityError, InvalidRequestError, NotFoundError
from swarm.scheduling.disaggregation import MODES
from swarm.transport.coordinator_client import MAX_UPLOAD_FILES, UPLOAD_SUFFIXES
from swarm.transport.transfer import FileHeader, FileReceiver, TransferLimits

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_UPLOAD_BYTES = 512 << 30
MAX_CHUNK_BYTES = 4 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inference_models (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    dir TEXT NOT NULL,
    params_json TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inference_probation (
    node_id TEXT PRIMARY KEY,
    strikes INTEGER NOT NULL,
    passed INTEGER NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


# Spot-check 5% of session steps by default: a node altering a fraction P of its steps is caught
# after about 1 / (0.05 P) of them (20 at P = 1). Cost: one prefill of the context on another
# chain per 20 session steps (bench/inference_checks.py, docs/benchmarks.md).
DEFAULT_VERIFY_PROB = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeParams:
    """How a model is served (from `swarm serve` flags)."""

    num_replicas: int | None = 1  # None: as many as fit
    num_stages: int | None = None
    max_seq_len: int = 0  # context per session; 0: the model's max_position_embeddings (see served_params)
    sessions_per_replica: int = 8
    objective: str = "latency"
    hidden_codec: str = "none"
    dtype: str = "float32"
    session_timeout_s: float = 120.0
    verify_prob: float = DEFAULT_VERIFY_PROB  # fraction of check windows (so of steps) spot-checked (0: off)
    routes: bool = False  # per-request routes over the replicas' stages (coordinator/inference/routes.py)
    # prefill and decode on separate chains (coordinator/inference/disagg.py): "on", "off", or "auto"
    # (when the options allow it and the placement predicts a gain: swarm.scheduling.disaggregation)
    disaggregate: str = "auto"

    def __post_init__(self) -> None:
        if self.num_replicas is not None and not 1 <= self.num_replicas <= 64:
            raise InvalidRequestError("--replicas must be in 1..64")
        if self.num_stages is not None and not 1 <= self.num_stages <= 256:
            raise InvalidRequestError("--stages must be in 1..256")
        if not 0 <= self.max_seq_len <= 1 << 17:
            raise InvalidRequestError("--max-seq-len must be in 1..131072 (0: the model's context)")
        if not 1 <= self.sessions_per_replica <= 1024:
            raise InvalidRequestError("--sessions must be in 1..1024")
        if self.objective not in ("latency", "throughput"):
            raise InvalidRequestError("--objective must be latency or throughput")
        if self.hidden_codec not in ("none", "int8", "auto"):
            raise InvalidRequestError("--hidden-codec must be none, int8 or auto (int8 on slow links)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidRequestError("--dtype must be float32, float16 or bfloat16")
        if not (math.isfinite(self.verify_prob) and 0.0 <= self.verify_prob <= 1.0):
            raise InvalidRequestError("--verify-prob must be a fraction in 0..1 (0: no spot checks)")
        if self.routes and self.verify_prob > 0:
            raise InvalidRequestError("--routes serves without spot checks (they compare whole chains); "
                                      "drop --verify-prob or pass --verify-prob 0")
        if self.disaggregate not in MODES:
            raise InvalidRequestError(f"--disaggregate must be one of {', '.join(MODES)}, got {self.disaggregate!r}")
        if self.disaggregate == "on" and self.routes:
            raise InvalidRequestError("--disaggregate and --routes cannot be combined (a session's KV moves between "
                                      "fixed prefill and decode chains); drop one of them")
        if self.disaggregate == "on" and self.num_replicas == 1:
            raise InvalidRequestError("--disaggregate needs 2+ chains (a prefill and a decode chain); pass "
                                      "--replicas 2 or more (the total of both), or 0 for as many as fit")


def _params_from_json(text: str) -> ServeParams:
    """Stored params; keys a newer coordinator dropped (``lanes``) are ignored, so rows written
    by an older one still load after an upgrade. ``disaggregate`` was a bool before the modes:
    true is "on", false "off" (a model served colocated before stays colocated)."""
    known = {f.name for f in fields(ServeParams)}
    raw = {k: v for k, v in json.loads(text).items() if k in known}
    if isinstance(raw.get("disaggregate"), bool):
        raw["disaggregate"] = "on" if raw["disaggregate"] else "off"
    return ServeParams(**raw)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    name: str
    digest: str
    dir: Path
    params: ServeParams
    state: str
    error: str
    size_bytes: int
    created_at_s: float


def served_params(params: ServeParams, max_position_embeddings: int) -> ServeParams:
    """``params`` with the context actually served: the model's ``max_position_embeddings``,
    capped by ``--max-seq-len`` when one was asked (0: none). A context past the model's
    positions cannot be served, so a larger ask is capped too."""
    model_max = int(max_position_embeddings)
    context = min(params.max_seq_len, model_max) if params.max_seq_len else model_max
    return params if context == params.max_seq_len else replace(params, max_seq_len=context)


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(
            f"model name {name[:80]!r} is invalid: use 1..64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return name


class ModelStore:
    """SQLite records + checkpoint directories. Thread-safe."""

    def __init__(self, db, state_dir: Path, *, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.root = Path(state_dir) / "models"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self._conn = db.connect()
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ records
    def put(self, rec: ModelRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO inference_models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.name, rec.digest, str(rec.dir), json.dumps(asdict(rec.params)), rec.state, rec.error,
                 rec.size_bytes, rec.created_at_s),
            )

    def set_state(self, name: str, state: str, error: str = "") -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE inference_models SET state = ?, error = ? WHERE name = ?", (state, error, name))

    def all(self) -> list[ModelRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM inference_models ORDER BY name").fetchall()
        return [
            ModelRecord(name=r[0], digest=r[1], dir=Path(r[2]), params=_params_from_json(r[3]), state=r[4],
                        error=r[5], size_bytes=r[6], created_at_s=r[7])
            for r in rows
        ]

    def get(self, name: str) -> ModelRecord:
        for r in self.all():
            if r.name == name:
                return r
        raise NotFoundError(f"model {name!r} is not served here; see `swarm models`")

    def remove(self, name: str) -> bool:
        with self._lock, self._conn:
            cur = self._conn.execute("DELETE FROM inference_models WHERE name = ?", (name,))
        shutil.rmtree(self.root / name, ignore_errors=True)
        return cur.rowcount > 0

    # ------------------------------------------------------------------ probation (checks.py)
    def probation(self) -> list[tuple[str, int, int, float, str]]:
        """Probation records: (node id, strikes, passed windows, since (epoch s), reason)."""
        with self._lock:
            return [tuple(r) for r in self._conn.execute(
                "SELECT node_id, strikes, passed, since, reason FROM inference_probation").fetchall()]

    def put_probation(self, rows: Iterable[tuple[str, int, int, float, str]], removed: Iterable[str] = ()) -> None:
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO inference_probation VALUES (?, ?, ?, ?, ?)", list(rows))
            self._conn.executemany("DELETE FROM inference_probation WHERE node_id = ?", [(n,) for n in removed])

    # ------------------------------------------------------------------ uploads
    def receive(self, name: str, files: list[tuple[str, int, str]], data: Iterable[tuple[str, bytes]],
                check: Callable[[Path], None] | None = None) -> tuple[Path, str, int]:
        """Store an upload. ``files``: (file name, size, sha256 hex) as announced; ``data``: (file
        name, bytes) pieces in any order. ``check`` (the received directory) may refuse the
        contents before they are kept. Returns (directory, digest, total bytes).

        Raises InvalidRequestError for anything that does not match the announcement.
        """
        check_model_name(name)
        if not 1 <= len(files) <= MAX_UPLOAD_FILES:
            raise InvalidRequestError(f"an upload has 1..{MAX_UPLOAD_FILES} files")
        announced: dict[str, tuple[int, str]] = {}
        for path, size, sha in files:
            if not FILE_RE.match(path) or not path.endswith(UPLOAD_SUFFIXES) or path in announced:
                raise InvalidRequestError(f"upload file name {path[:80]!r} is invalid or repeated (plain names ending {UPLOAD_SUFFIXES})")
            if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise InvalidRequestError(f"upload file {path}: size must be >= 0 and sha256 64 hex digits")
            announced[path] = (size, sha)
        if "config.json" not in announced or not any(p.endswith(".safetensors") for p in announced):
            raise InvalidRequestError("an upload needs config.json and at least one .safetensors file")
        total = sum(s for s, _ in announced.values())
        if total > self.max_upload_bytes:
            raise InvalidRequestError(f"checkpoint of {total} bytes exceeds the coordinator's limit of {self.max_upload_bytes}")
        free = shutil.disk_usage(self.root).free
        if total > free - (1 << 30):
            raise CapacityError(f"the coordinator has {free >> 20} MiB free disk, the checkpoint needs {total >> 20} MiB")
        digest = hashlib.sha256("".join(f"{p}:{announced[p][1]}\n" for p in sorted(announced)).encode()).hexdigest()
        final = self.root / name / digest[:16]
        tmp = self.root / name / f".upload-{digest[:16]}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        limits = TransferLimits(max_file_bytes=self.max_upload_bytes, max_total_bytes=self.max_upload_bytes,
                                max_files=MAX_UPLOAD_FILES, max_chunk_bytes=MAX_CHUNK_BYTES)
        receiver = FileReceiver(tmp, limits=limits)
        try:
            for path, (size, sha) in announced.items():
                receiver.start(FileHeader(name=path, size_bytes=size, sha256=sha), current=False)
            for path, chunk in data:
                if path not in announced:
                    raise InvalidRequestError(f"upload data for {path[:80]!r}, which the header did not announce")
                receiver.write(chunk, name=path)
            receiver.finish()
            if check is not None:
                check(tmp)
            if final.exists():
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
        except BaseException:
            receiver.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("stored checkpoint model=%s digest=%s bytes=%d dir=%s", name, digest[:16], total, final)
        return final, digest, total
