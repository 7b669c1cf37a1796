"""Shared-memory payloads between tensor-stream neighbours on one host (swarm/transport/shm.py):
real gRPC over TLS on loopback, real files."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from swarm.errors import InvalidRequestError
from swarm.transport import frames, shm
from swarm.transport import tensors as wt

from node.training.exchange import Endpoint
from node.training.sender import PeerSender
from tests.helpers.peer_server import start_peer_server
from tests.helpers.tls import TestPki

pytestmark = pytest.mark.timeout(60)

SHAPE = (4, 16, 32)
A, B = "a" * 32, "b" * 32


def _validate(h: wt.TensorHeader, payload: bytes) -> torch.Tensor:
    wt.validate_header(h, wt.TensorExpectation(job_id="job", kind="activation", shape=SHAPE, dtype="float32"))
    return wt.raw_decode(payload, shape=h.shape, dtype=h.dtype)


def _wire(t: torch.Tensor, *, mb: int) -> wt.WireTensor:
    payload = wt.raw_encode(t)
    h = wt.make_header(payload, job_id="job", step=0, micro_batch=mb, shape=tuple(t.shape), dtype="float32",
                       kind="activation", sender_id=A)
    return wt.WireTensor(header=h, payload=payload)


def _our_slots() -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"swarm-{os.getpid()}-")]


@pytest.fixture()
def pki(tmp_path):
    return TestPki(tmp_path / "ca")


def _server(pki, monkeypatch, *, receiver_shm: bool):
    if not receiver_shm:  # a receiver that reads no shared memory (as a node on another host)
        monkeypatch.setenv(shm.ENV_DISABLE, "1")
    srv, endpoints, address = start_peer_server(pki.node(B))
    monkeypatch.delenv(shm.ENV_DISABLE, raising=False)
    return srv, endpoints, address


@pytest.mark.parametrize("receiver_shm", [True, False])
def test_tensors_arrive_whole_through_shared_memory_or_inline_when_the_receiver_cannot_read_it(
        pki, monkeypatch, receiver_shm):
    if not shm.enabled():
        pytest.skip("no /dev/shm on this machine")
    srv, endpoints, address = _server(pki, monkeypatch, receiver_shm=receiver_shm)
    ep = Endpoint("job", _validate)
    endpoints.add(ep)
    sender = PeerSender(address, security=pki.node(A), node_id=B, what="peer", timeout_s=10, max_queued=4)
    try:
        assert sender._stream.shared_memory  # a neighbour on this host: slots first
        sent = [torch.randn(*SHAPE) for _ in range(11)]  # more than the window: slots are reused
        for mb, t in enumerate(sent):
            sender.send(_wire(t, mb=mb))
        sender.flush()
        stop = threading.Event()
        for mb, t in enumerate(sent):
            assert torch.equal(ep.get("activation", 0, mb, timeout_s=5, stop=stop, what="peer"), t)
        # a receiver that cannot read the slots made the sender go inline, with nothing lost
        assert sender._stream.shared_memory is receiver_shm
        assert ep.num_rejected == 0
        assert _our_slots() == []  # every slot's name is unlinked once a frame through it was acknowledged
    finally:
        sender.close()
        srv.stop(0)
    assert _our_slots() == []


def test_reader_refuses_slots_that_are_not_private_files_of_this_user(tmp_path):
    reader = shm.ShmReader(shm_dir=str(tmp_path))
    slots = shm.ShmSlots(2, shm_dir=str(tmp_path))
    name = slots.put(1, [b"abc", b"defg"], 7)
    assert reader.read(name, 7) == b"abcdefg"
    with pytest.raises(InvalidRequestError, match="exceeds"):
        reader.read(name, 1 << 20)
    for bad in ("../etc/passwd", "swarm-1-xyz", "swarm-1-" + "0" * 31, ""):
        with pytest.raises(InvalidRequestError, match="malformed"):
            reader.read(bad, 1)
    missing = f"swarm-1-{'0' * 32}"
    with pytest.raises(shm.ShmUnavailableError, match=shm.UNAVAILABLE_TAG):
        reader.read(missing, 1)
    shared = tmp_path / f"swarm-1-{'1' * 32}"
    shared.write_bytes(b"x" * 64)
    shared.chmod(0o644)  # readable by others: not a private slot
    with pytest.raises(shm.ShmUnavailableError, match="private"):
        reader.read(shared.name, 1)
    link = tmp_path / f"swarm-1-{'2' * 32}"
    link.symlink_to(tmp_path / name)  # a link to a real slot is still refused
    with pytest.raises(shm.ShmUnavailableError):
        reader.read(link.name, 1)
    slots.acked(1)
    assert not (tmp_path / name).exists()  # unlinked once acknowledged
    assert reader.read(name, 7) == b"abcdefg"  # the reader's mapping outlives the name
    slots.close()
    reader.close()


def test_frame_through_a_slot_checks_its_crc():
    payload = os.urandom(1000)
    h = frames.payload_header([payload], job_id="job", kind="activation", sender_id=A, shape=(250,),
                               dtype="float32", step=0, micro_batch=0)
    slots = shm.ShmSlots(1)
    reader = shm.ShmReader()
    try:
        frame = frames.encode_ref_frame(3, h, slots.put(3, [payload], len(payload)))
        seq, h2, got = frames.decode_frame(frame, max_payload_bytes=1 << 20, shm=reader)
        assert (seq, bytes(got), h2.payload_crc32) == (3, payload, h.payload_crc32)
        with pytest.raises(InvalidRequestError, match="unknown field"):  # a receiver without shared memory
            frames.decode_frame(frame, max_payload_bytes=1 << 20)
        with pytest.raises(InvalidRequestError, match="not a valid TensorHeader"):  # garbage where the header is
            frames.decode_frame(b"\x08\x01\x12\x02\x00\x00", max_payload_bytes=1 << 20, shm=reader)
        slots.put(3, [bytes(1000)], 1000)  # the slot changed under the frame
        with pytest.raises(InvalidRequestError, match="checksum"):
            frames.decode_frame(frame, max_payload_bytes=1 << 20, shm=reader)
    finally:
        slots.close()
        reader.close()


def test_sweep_removes_slots_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)
    gone = tmp_path / f"swarm-{int(dead.stdout)}-{'a' * 32}"
    alive = tmp_path / f"swarm-{os.getpid()}-{'b' * 32}"
    other = tmp_path / "torch_123"
    for f in (gone, alive, other):
        f.write_bytes(b"x")
    assert shm.sweep(str(tmp_path)) == 1
    assert not gone.exists() and alive.exists() and other.exists()


def test_a_full_dev_shm_sends_inline_and_loses_nothing(pki, monkeypatch):
    if not shm.enabled():
        pytest.skip("no /dev/shm on this machine")
    srv, endpoints, address = _server(pki, monkeypatch, receiver_shm=True)
    ep = Endpoint("job", _validate)
    endpoints.add(ep)

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    sender = PeerSender(address, security=pki.node(A), node_id=B, what="peer", timeout_s=10, max_queued=4)
    try:
        sent = [torch.randn(*SHAPE) for _ in range(3)]
        for mb, t in enumerate(sent):
            sender.send(_wire(t, mb=mb))
        sender.flush()
        stop = threading.Event()
        assert [torch.equal(ep.get("activation", 0, mb, timeout_s=5, stop=stop, what="peer"), t)
                for mb, t in enumerate(sent)] == [True] * 3
        assert not sender._stream.shared_memory
    finally:
        sender.close()
        srv.stop(0)
    assert _our_slots() == []
