"""Shared-memory payloads for tensor streams between nodes on one host (issue 16).

Why: two node processes on one machine (a volunteer with several GPUs runs one node per GPU;
a benchmark runs three on one H200) exchange every boundary tensor through TCP loopback, TLS
and gRPC's Python path: ~3 CPU seconds per GB moved, measured (docs/benchmarks.md, "Data plane:
TLS against plaintext"), ~10 ms per 4 MiB micro-batch tensor on the pipeline's critical path.
Through a shared file the payload costs one copy in and one copy out.

Protocol. A tensor stream (swarm/transport/streams.py) to a neighbour whose address is on this
host tries shared memory first. The sender keeps one slot per window position (``seq %
window``): a file ``/dev/shm/swarm-<pid>-<32 random hex>`` created with mode 0600, written in
place and referenced by its name in the frame (``TensorFrame`` field 4, instead of the payload,
field 3). The header still carries the payload's size and CRC-32, and the stream's TLS still
authenticates the sender and carries the header. A slot is reused only after its frame was
acknowledged (the stream's window guarantees it), and grows into a new file when a payload
outgrows it. The sender unlinks a slot's name once a frame through it was acknowledged (the
receiver keeps its mapping), so a killed sender leaves at most a window of files, which the next
node process on the host removes (:func:`sweep`: files of dead pids).

The receiver (:class:`ShmReader`) opens a referenced name only if it is well formed, a regular
file owned by its own user with no group or other permissions, and large enough; it copies the
payload out before it is validated (the sender may reuse the slot after the ack), so nothing
keeps a view of shared memory. A name is a 128-bit capability sent only over the stream's TLS:
a peer on another host cannot name another stream's slot. A receiver that cannot open the file
(another host or user, no /dev/shm) answers ``FAILED_PRECONDITION`` with :data:`UNAVAILABLE_TAG`
in the message; the sender then sends that frame and every later one inline.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import threading
from collections.abc import Sequence

from swarm.errors import InvalidRequestError, VersionMismatchError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_RE = re.compile(r"^swarm-(\d{1,10})-([0-9a-f]{32})$")
UNAVAILABLE_TAG = "shared-memory payload unavailable"
MAX_MAPPINGS = 256  # per reader: many streams' windows (a mapping costs address space only)
ENV_DISABLE = "SWARM_NO_SHM"  # "1": every stream sends inline (benchmarks, debugging)


class ShmUnavailableError(VersionMismatchError):
    """The receiver cannot use a shared-memory slot (FAILED_PRECONDITION): send inline."""


def enabled() -> bool:
    return os.environ.get(ENV_DISABLE, "") != "1" and os.path.isdir(SHM_DIR)


def is_local_address(address: str) -> bool:
    """True when ``address`` (host:port) names this machine: loopback, or one of this host's
    own addresses (what a node on a multi-GPU machine advertises to its neighbours)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return host in own


def sweep(shm_dir: str = SHM_DIR) -> int:
    """Remove this user's slot files whose creating process is gone; returns how many."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        m = NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        path = os.path.join(shm_dir, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
        except OSError:
            continue
    return removed


class _Slot:
    __slots__ = ("name", "size", "mm", "linked")

    def __init__(self, shm_dir: str, size: int) -> None:
        self.name = f"swarm-{os.getpid()}-{secrets.token_hex(16)}"
        self.size = size
        path = os.path.join(shm_dir, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # reserve the pages now: a full /dev/shm (Docker's default is 64 MiB) fails here with
            # ENOSPC, not later with SIGBUS when the slot is written
            os.posix_fallocate(fd, 0, size)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.linked = True


class ShmSlots:
    """The sender's slots of one stream (used by its sending thread, and ``acked`` by its ack
    thread). ``put`` copies a payload into slot ``seq % window`` and returns the slot's name."""

    def __init__(self, window: int, *, shm_dir: str = SHM_DIR) -> None:
        self.window = max(1, window)
        self.shm_dir = shm_dir
        self._slots: dict[int, _Slot] = {}
        self._by_seq: dict[int, _Slot] = {}
        self._lock = threading.Lock()

    def put(self, seq: int, parts: Sequence, nbytes: int) -> str:
        """Raises OSError when no slot can be made (``/dev/shm`` full): send inline then."""
        with self._lock:
            slot = self._slots.get(seq % self.window)
            if slot is None or slot.size < nbytes:
                if slot is not None:
                    self._drop(slot)
                    del self._slots[seq % self.window]
                slot = self._slots[seq % self.window] = _Slot(self.shm_dir, max(nbytes, 1 << 16))
            self._by_seq[seq] = slot
        off = 0
        for p in parts:
            mv = memoryview(p).cast("B")
            slot.mm[off:off + mv.nbytes] = mv
            off += mv.nbytes
        return slot.name

    def payload(self, seq: int, nbytes: int) -> bytes:
        """A copy of what frame ``seq`` put (to re-send it inline)."""
        with self._lock:
            slot = self._by_seq[seq]
        return bytes(slot.mm[:nbytes])

    def acked(self, seq: int) -> None:
        """Frame ``seq`` was acknowledged: the receiver has mapped its slot, so unlink the name."""
        with self._lock:
            slot = self._by_seq.pop(seq, None)
            if slot is not None and slot.linked:
                self._unlink(slot)

    def close(self) -> None:
        with self._lock:
            for slot in self._slots.values():
                self._drop(slot)
            self._slots.clear()
            self._by_seq.clear()

    def _unlink(self, slot: _Slot) -> None:
        slot.linked = False
        try:
            os.unlink(os.path.join(self.shm_dir, slot.name))
        except OSError:
            pass

    def _drop(self, slot: _Slot) -> None:
        if slot.linked:
            self._unlink(slot)
        try:
            slot.mm.close()
        except BufferError:  # a view still exported (a re-send in progress): the GC closes it
            pass


class ShmReader:
    """The receiver's read-only mappings of referenced slots (LRU, :data:`MAX_MAPPINGS`)."""

    def __init__(self, *, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self._maps: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read(self, name: str, nbytes: int) -> bytes:
        """A copy of the first ``nbytes`` of slot ``name``. Raises InvalidRequestError for a
        malformed name, ShmUnavailableError (message with :data:`UNAVAILABLE_TAG`) when
        the file cannot be used here."""
        if NAME_RE.match(name) is None:
            raise InvalidRequestError("tensor frame names a malformed shared-memory slot")
        with self._lock:
            mm = self._maps.get(name)
            if mm is None:
                mm = self._open(name)
                self._maps[name] = mm
                while len(self._maps) > MAX_MAPPINGS:
                    self._maps.popitem(last=False)[1].close()
            else:
                self._maps.move_to_end(name)
            if nbytes > len(mm):
                raise InvalidRequestError(f"tensor frame's payload ({nbytes} bytes) exceeds its shared-memory slot "
                                          f"({len(mm)} bytes)")
            return mm[:nbytes]

    def _open(self, name: str) -> mmap.mmap:
        path = os.path.join(self.shm_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ShmUnavailableError(f"{UNAVAILABLE_TAG}: {exc.strerror}; send payloads inline") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size <= 0:
                raise ShmUnavailableError(f"{UNAVAILABLE_TAG}: the slot is not a private file of this user; "
                                              "send payloads inline")
            return mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                mm.close()
            self._maps.clear()
