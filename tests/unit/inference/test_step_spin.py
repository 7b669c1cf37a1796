"""Busy-polled step-wire reads (swarm/transport/spin.py ``spin_setting``, ``wait_readable``):
who spins by default, the override, and that a spinning read still returns the message that
arrives (or falls through to the blocking read when none does)."""

from __future__ import annotations

import select
import socket
import threading

import pytest

from swarm.transport.spin import (DEFAULT_GPU_SPIN_US, ENDPOINTS, MAX_ENDPOINTS_TO_SPIN, SPIN_ENV, spin_setting,
                                  wait_readable)


def test_gpu_nodes_with_cores_to_spare_spin_and_others_do_not(monkeypatch):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert spin_setting("cuda:0", cores=16) == DEFAULT_GPU_SPIN_US / 1e6
    assert spin_setting("cuda", cores=2) == 0.0  # a small box needs its cores
    assert spin_setting("cpu", cores=64) == 0.0
    monkeypatch.setenv(SPIN_ENV, "250")
    assert spin_setting("cpu", cores=2) == 250e-6
    monkeypatch.setenv(SPIN_ENV, "0")
    assert spin_setting("cuda", cores=16) == 0.0
    monkeypatch.setenv(SPIN_ENV, "1e9")
    assert spin_setting("cpu") == 0.1  # bounded
    monkeypatch.setenv(SPIN_ENV, "fast")
    assert spin_setting("cpu", cores=16) == 0.0  # not a number: the default


@pytest.mark.timeout(20)
def test_a_spinning_read_returns_what_arrives_and_falls_through_when_nothing_does():
    a, b = socket.socketpair()
    try:
        wait_readable(a, 0.001)  # nothing comes: returns after the spin, the caller's read blocks
        sender = threading.Timer(0.01, lambda: b.sendall(b"step"))
        sender.start()
        wait_readable(a, 5.0)  # returns as soon as the bytes are there, long before 5 s
        assert a.recv(4) == b"step"
        sender.join()
        b.sendall(b"x")
        wait_readable(a, 0.0)  # no spin: returns at once
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(20)
def test_no_spin_while_more_than_one_chain_runs_through_the_process(monkeypatch):
    """With more step-wire connections open than one chain needs, a read blocks at once: a
    spinning thread would hold up another connection's compute for the GIL."""
    a, b = socket.socketpair()
    polls = []
    real_poll = select.poll

    class CountingPoll:
        def __init__(self):
            self._p = real_poll()

        def register(self, *args):
            self._p.register(*args)

        def poll(self, timeout):
            polls.append(timeout)
            return self._p.poll(timeout)

    monkeypatch.setattr(select, "poll", CountingPoll)
    try:
        monkeypatch.setattr(ENDPOINTS, "count", MAX_ENDPOINTS_TO_SPIN + 1)
        wait_readable(a, 0.05)
        assert polls == []
        monkeypatch.setattr(ENDPOINTS, "count", MAX_ENDPOINTS_TO_SPIN)  # one chain: it spins
        wait_readable(a, 0.001)
        assert polls and set(polls) == {0}
    finally:
        a.close()
        b.close()
