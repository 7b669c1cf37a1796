"""Copying bytes between two sockets, paced: what relays and punched paths run on.

:func:`splice` copies both ways until both directions end (a half-close is passed on) with a
tight ``recv_into`` / ``sendall`` loop on two threads; a :class:`TokenBucket` paces the bytes
and callbacks count them (relay accounting). bench/nat.py measures its CPU per Gbit/s.
"""

from __future__ import annotations

import socket
import threading
import time

from swarm.clock import Clock

BUF_BYTES = 256 << 10


class TokenBucket:
    """``rate_Bps`` sustained, ``burst_bytes`` at once. :meth:`reserve` takes n bytes (the level
    may go negative) and returns the seconds the caller must wait before sending them."""

    def __init__(self, rate_Bps: float, burst_bytes: int, clock: Clock) -> None:
        self.rate_Bps, self.burst_bytes, self._clock = float(rate_Bps), int(burst_bytes), clock
        self._level = float(burst_bytes)
        self._at = clock.monotonic()
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        with self._lock:
            now = self._clock.monotonic()
            self._level = min(self.burst_bytes, self._level + (now - self._at) * self.rate_Bps) - n
            self._at = now
            return 0.0 if self._level >= 0 else -self._level / self.rate_Bps


def splice(a: socket.socket, b: socket.socket, *, bucket: TokenBucket | None = None,
           on_a_to_b=None, on_b_to_a=None) -> None:
    """Copy bytes both ways until both directions end (a half-close is passed on). Runs a -> b
    on a new thread and b -> a on this one; returns when both are done. Callbacks get byte
    counts; ``bucket`` paces both directions."""
    for s in (a, b):
        s.settimeout(None)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=_pump, args=(a, b, bucket, on_a_to_b), name="splice", daemon=True)
    t.start()
    _pump(b, a, bucket, on_b_to_a)
    t.join()


def _pump(src: socket.socket, dst: socket.socket, bucket: TokenBucket | None, on_bytes) -> None:
    buf = bytearray(BUF_BYTES)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                return
            if bucket is not None and (wait_s := bucket.reserve(n)) > 0:
                time.sleep(wait_s)  # pacing real bytes on a real socket: the one sleep that must be
            dst.sendall(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    except OSError:
        for s in (src, dst):  # one side broke: end both directions
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass


def close_quietly(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
