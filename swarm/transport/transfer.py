"""Chunked file transfer with announced sizes and SHA-256 digests, for every upload and download.

The protocol every sender and receiver follows, whatever RPC carries it: a file starts with a
:class:`FileHeader` (name, size in bytes, SHA-256 hex of the whole file) followed by its bytes
in chunks of at most :data:`CHUNK_BYTES`. The receiver checks the name, the announced size
against its :class:`TransferLimits` *before* writing anything, never accepts more bytes than
announced, writes into a temporary file next to the target and renames it into place only once
size and digest match. Every refusal is a :class:`~swarm.errors.SwarmError` that says what to do
(``InvalidRequestError`` for a bad stream, ``CapacityError`` for limits and a full disk).

This module knows no protobuf: each RPC's adapter (in its client or servicer) maps its own
header/data messages to ``FileHeader | bytes`` items and back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from swarm.errors import CapacityError, InvalidRequestError, SwarmError

CHUNK_BYTES = 1 << 20  # 1 MiB: well under the control plane's 16 MiB message limit
MAX_NAME_CHARS = 1000
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL = ".partial-"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileHeader:
    """What a sender announces before a file's bytes. ``sha256``: lowercase hex of the file."""

    name: str
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > MAX_NAME_CHARS:
            raise InvalidRequestError(f"file name must be 1..{MAX_NAME_CHARS} characters")
        if not isinstance(self.size_bytes, int) or self.size_bytes < 0:
            raise InvalidRequestError(f"file {self.name[:80]!r}: size_bytes must be an integer >= 0")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise InvalidRequestError(f"file {self.name[:80]!r} needs a hex SHA-256 digest (64 lowercase hex digits)")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferLimits:
    """What a receiver accepts. Sizes in bytes; chunks larger than ``max_chunk_bytes`` are refused."""

    max_file_bytes: int
    max_total_bytes: int
    max_files: int = 10_000
    max_chunk_bytes: int = 4 * CHUNK_BYTES

    def __post_init__(self) -> None:
        if min(self.max_file_bytes, self.max_total_bytes, self.max_files, self.max_chunk_bytes) < 0:
            raise ValueError("transfer limits must be >= 0")


Item = FileHeader | bytes


# ----------------------------------------------------------------------------- names
def check_bare_name(name: str) -> str:
    """``name`` if it is a plain file name (no ``/``, ``\\``, NUL, ``.``/``..``); else InvalidRequestError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255
            or any(c in name for c in "/\\\0") or name.startswith(_PARTIAL.rstrip("-"))):
        raise InvalidRequestError(f"file name {str(name)[:80]!r} must be a plain name without '/', '..' or NUL")
    return name


def check_relative_name(name: str, *, roots: tuple[str, ...]) -> PurePosixPath:
    """A relative POSIX path under one of ``roots`` (e.g. ``data/a/b.txt``); each component is
    checked like :func:`check_bare_name`. Raises InvalidRequestError naming the rule broken."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        raise InvalidRequestError(f"file name {str(name)[:80]!r} must be a plain relative path")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"file name longer than {MAX_NAME_CHARS} characters")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidRequestError(f"file name {name[:80]!r} must be a plain relative path")
    for part in parts:
        check_bare_name(part)
    if parts[0] not in roots or len(parts) < 2:
        raise InvalidRequestError(f"file {name[:80]!r} must live under one of {roots}")
    return PurePosixPath(name)


# ----------------------------------------------------------------------------- sending
def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's contents, read in :data:`CHUNK_BYTES` blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def file_header(name: str, path: Path) -> FileHeader:
    path = Path(path)
    return FileHeader(name=name, size_bytes=path.stat().st_size, sha256=sha256_file(path))


def bytes_header(name: str, data: bytes) -> FileHeader:
    return FileHeader(name=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def iter_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES, on_bytes: Callable[[int], None] | None = None
              ) -> Iterator[bytes]:
    """A file's bytes in chunks; ``on_bytes(n)`` is called before each chunk is handed out."""
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            if on_bytes is not None:
                on_bytes(len(block))
            yield block


def send_files(files: Iterable[tuple[str, Path]], *, chunk_bytes: int = CHUNK_BYTES,
               on_bytes: Callable[[int], None] | None = None) -> Iterator[Item]:
    """``FileHeader`` then data chunks for each (name, local path), in order."""
    for name, path in files:
        yield file_header(name, path)
        yield from iter_file(path, chunk_bytes=chunk_bytes, on_bytes=on_bytes)


def send_bytes(name: str, data: bytes, *, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Item]:
    """One in-memory file as ``FileHeader`` then data chunks."""
    yield bytes_header(name, data)
    for start in range(0, len(data), chunk_bytes):
        yield data[start:start + chunk_bytes]


# ----------------------------------------------------------------------------- receiving
def _os_error(exc: OSError, what: str) -> SwarmError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CapacityError(f"no space left to write {what} ({exc.strerror}); free disk space and send it again")
    return CapacityError(f"cannot write {what} ({exc.strerror or exc}); check the receiver's disk and permissions")


class _Incoming:
    __slots__ = ("header", "target", "tmp", "fh", "hasher", "written")

    def __init__(self, header: FileHeader, target: Path) -> None:
        self.header = header
        self.target = target
        self.tmp = target.with_name(f"{_PARTIAL}{secrets.token_hex(4)}-{target.name}")
        self.hasher = hashlib.sha256()
        self.written = 0
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.tmp.open("wb")


class FileReceiver:
    """Writes ``FileHeader | bytes`` items to files under ``root``, checking names, limits, sizes and
    SHA-256 digests; a file appears under its name only once it matched its header.

    Sequential streams call :meth:`start` for each header and :meth:`write` for its data; a
    stream that announces all files up front calls :meth:`start` for each with ``current=False``
    and then ``write(data, name=...)``. :meth:`finish` verifies every open file; :meth:`abort`
    (or any error raised by these methods) removes the temporary files. ``roots`` set: names are
    relative paths under them (``data/a.txt``); ``roots`` None: bare file names.
    """

    def __init__(self, root: Path, *, limits: TransferLimits, roots: tuple[str, ...] | None = None) -> None:
        self.root = Path(root)
        self.limits = limits
        self.roots = roots
        self.total_bytes = 0
        self.files: list[PurePosixPath] = []
        self._announced_bytes = 0
        self._open: dict[str, _Incoming] = {}
        self._current: _Incoming | None = None

    def _name(self, name: str) -> PurePosixPath:
        if self.roots is None:
            return PurePosixPath(check_bare_name(name))
        return check_relative_name(name, roots=self.roots)

    def start(self, header: FileHeader, *, current: bool = True) -> None:
        """Begin a file. In sequential use (``current=True``) this first finishes the previous one."""
        try:
            if current:
                self._close_current()
            rel = self._name(header.name)
            if rel in self.files:
                raise InvalidRequestError(f"file {header.name} sent twice; send each file once")
            if len(self.files) >= self.limits.max_files:
                raise InvalidRequestError(f"more than {self.limits.max_files} files in one transfer; send fewer files")
            if header.size_bytes > self.limits.max_file_bytes:
                raise CapacityError(f"file {header.name} is {header.size_bytes} bytes; the limit is "
                                    f"{self.limits.max_file_bytes}")
            if self._announced_bytes + header.size_bytes > self.limits.max_total_bytes:
                raise CapacityError(f"transfer exceeds {self.limits.max_total_bytes} bytes in total; send less data")
            try:
                inc = _Incoming(header, self.root / rel)
            except OSError as exc:
                raise _os_error(exc, header.name) from exc
            self._open[header.name] = inc
            self.files.append(rel)
            self._announced_bytes += header.size_bytes
            if current:
                self._current = inc
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes, *, name: str | None = None) -> None:
        """Append ``data`` to the current file (or to the open file ``name``)."""
        if not data:
            return
        try:
            inc = self._current if name is None else self._open.get(name)
            if inc is None:
                raise InvalidRequestError("file data arrived before its FileHeader" if name is None else
                                          f"data for {name[:80]!r}, which was not announced")
            if len(data) > self.limits.max_chunk_bytes:
                raise InvalidRequestError(f"chunks are at most {self.limits.max_chunk_bytes} bytes; send smaller ones")
            if inc.written + len(data) > inc.header.size_bytes:
                raise InvalidRequestError(f"file {inc.header.name} is larger than the {inc.header.size_bytes} bytes "
                                          "announced; send the right size")
            try:
                inc.fh.write(data)
            except OSError as exc:
                raise _os_error(exc, inc.header.name) from exc
            inc.hasher.update(data)
            inc.written += len(data)
            self.total_bytes += len(data)
        except BaseException:
            self.abort()
            raise

    def _verify(self, inc: _Incoming) -> None:
        try:
            inc.fh.close()
        except OSError as exc:
            raise _os_error(exc, inc.header.name) from exc
        h = inc.header
        if inc.written != h.size_bytes:
            raise InvalidRequestError(f"file {h.name} has {inc.written} bytes, {h.size_bytes} were announced; "
                                      "the transfer was cut short, send it again")
        if inc.hasher.hexdigest() != h.sha256:
            raise InvalidRequestError(f"file {h.name} failed its SHA-256 check (sha256 mismatch): corrupted in "
                                      "transit; send it again")
        try:
            os.replace(inc.tmp, inc.target)
        except OSError as exc:
            raise _os_error(exc, h.name) from exc
        del self._open[h.name]

    def _close_current(self) -> None:
        if self._current is not None:
            inc, self._current = self._current, None
            self._verify(inc)

    def finish(self) -> list[PurePosixPath]:
        """Verify and move every open file into place; returns the names received, in order."""
        try:
            self._current = None
            for inc in list(self._open.values()):
                self._verify(inc)
        except BaseException:
            self.abort()
            raise
        return list(self.files)

    def abort(self) -> None:
        """Close and delete the temporary files of unfinished files (finished ones stay)."""
        self._current = None
        for inc in self._open.values():
            try:
                inc.fh.close()
            except OSError:
                pass
            inc.tmp.unlink(missing_ok=True)
        self._open.clear()


def receive_files(items: Iterable[Item], root: Path, *, limits: TransferLimits,
                  roots: tuple[str, ...] | None = None) -> list[PurePosixPath]:
    """Drive a :class:`FileReceiver` over a sequential stream; returns the names written."""
    receiver = FileReceiver(root, limits=limits, roots=roots)
    try:
        for item in items:
            if isinstance(item, FileHeader):
                receiver.start(item)
            else:
                receiver.write(item)
    except BaseException:
        receiver.abort()
        raise
    return receiver.finish()


def receive_bytes(items: Iterable[Item], *, max_bytes: int) -> tuple[FileHeader, bytes]:
    """One file from a stream, into memory, size- and SHA-256-checked."""
    header: FileHeader | None = None
    buf = bytearray()
    for item in items:
        if isinstance(item, FileHeader):
            if header is not None:
                raise InvalidRequestError("expected one file in the stream")
            if item.size_bytes > max_bytes:
                raise CapacityError(f"file of {item.size_bytes} bytes is over the limit of {max_bytes}")
            header = item
        elif item:
            if header is None or len(buf) + len(item) > header.size_bytes:
                raise InvalidRequestError("file data without a header or past its announced size")
            buf += item
    if header is None or len(buf) != header.size_bytes:
        raise InvalidRequestError("file stream ended early (the transfer was cut short); fetch it again")
    if hashlib.sha256(buf).hexdigest() != header.sha256:
        raise InvalidRequestError("downloaded file failed its SHA-256 check (sha256 mismatch); fetch it again")
    return header, bytes(buf)
