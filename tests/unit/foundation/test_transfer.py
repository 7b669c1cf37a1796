"""The one chunked-transfer mechanism: sizes, SHA-256, names, limits, disk errors, temp files."""

from __future__ import annotations

import errno
import hashlib

import pytest

from swarm.errors import CapacityError, InvalidRequestError
from swarm.transport import transfer
from swarm.transport.transfer import FileHeader, FileReceiver, TransferLimits

LIMITS = TransferLimits(max_file_bytes=1 << 20, max_total_bytes=2 << 20)


def header(name: str, data: bytes, **over) -> FileHeader:
    fields = {"name": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} | over
    return FileHeader(**fields)


def leftovers(root) -> list[str]:
    return [p.name for p in root.rglob("*") if p.is_file() and p.name.startswith(".partial")]


def test_round_trip_through_send_and_receive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 3000)
    (src / "b.txt").write_bytes(b"")
    items = list(transfer.send_files([("data/a.bin", src / "a.bin"), ("data/sub/b.txt", src / "b.txt")],
                                     chunk_bytes=1024))
    assert [type(i).__name__ for i in items] == ["FileHeader", "bytes", "bytes", "bytes", "FileHeader"]
    names = transfer.receive_files(items, tmp_path / "out", limits=LIMITS, roots=("data",))
    assert [n.as_posix() for n in names] == ["data/a.bin", "data/sub/b.txt"]
    assert (tmp_path / "out/data/a.bin").read_bytes() == b"x" * 3000
    assert (tmp_path / "out/data/sub/b.txt").read_bytes() == b""
    assert transfer.sha256_file(src / "a.bin") == hashlib.sha256(b"x" * 3000).hexdigest()
    h, data = transfer.receive_bytes(transfer.send_bytes("w.bin", b"abc" * 10, chunk_bytes=7), max_bytes=100)
    assert h.name == "w.bin" and data == b"abc" * 10


def test_more_bytes_than_announced_is_refused_and_cleaned(tmp_path):
    r = FileReceiver(tmp_path, limits=LIMITS)
    r.start(header("f.bin", b"abc"))
    with pytest.raises(InvalidRequestError, match="larger than the 3 bytes announced"):
        r.write(b"abcd")
    assert leftovers(tmp_path) == [] and not (tmp_path / "f.bin").exists()
    with pytest.raises(InvalidRequestError, match="past its announced size"):
        transfer.receive_bytes([header("f", b"ab"), b"abc"], max_bytes=10)


def test_short_file_and_hash_mismatch_are_refused_and_never_appear(tmp_path):
    with pytest.raises(InvalidRequestError, match="cut short"):
        transfer.receive_files([header("f.bin", b"abcdef"), b"abc"], tmp_path, limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="SHA-256"):
        transfer.receive_files([header("g.bin", b"abc", sha256="0" * 64), b"abc"], tmp_path, limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="SHA-256"):
        transfer.receive_bytes([header("g.bin", b"abc", sha256="0" * 64), b"abc"], max_bytes=10)
    assert list(tmp_path.iterdir()) == []


def test_data_before_header_and_duplicate_files_are_refused(tmp_path):
    with pytest.raises(InvalidRequestError, match="before its FileHeader"):
        transfer.receive_files([b"abc"], tmp_path, limits=LIMITS)
    with pytest.raises(InvalidRequestError, match="sent twice"):
        transfer.receive_files([header("f", b"a"), b"a", header("f", b"a"), b"a"], tmp_path, limits=LIMITS)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/etc/passwd", "a\\b", "a\0b", ".partial-x", "x" * 300])
def test_bare_names_refuse_paths(tmp_path, name):
    with pytest.raises(InvalidRequestError):
        transfer.check_bare_name(name)
    if name:
        with pytest.raises(InvalidRequestError):
            FileReceiver(tmp_path, limits=LIMITS).start(FileHeader(name=name, size_bytes=0, sha256="0" * 64))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["data", "data/", "/data/a", "data/../x", "data/./a", "data//a", "other/a",
                                  "data/a\\b", "data/a\0", "data/.."])
def test_relative_names_validate_every_component(name):
    with pytest.raises(InvalidRequestError):
        transfer.check_relative_name(name, roots=("data", "checkpoint"))


def test_relative_names_accept_nested_paths():
    assert transfer.check_relative_name("data/a/b.txt", roots=("data",)).parts == ("data", "a", "b.txt")


def test_header_needs_a_size_and_a_hex_digest():
    with pytest.raises(InvalidRequestError, match="size_bytes"):
        FileHeader(name="f", size_bytes=-1, sha256="0" * 64)
    for bad in ("", "0" * 63, "G" * 64, "A" * 64):
        with pytest.raises(InvalidRequestError, match="SHA-256"):
            FileHeader(name="f", size_bytes=0, sha256=bad)


def test_limits_are_checked_before_anything_is_written(tmp_path):
    small = TransferLimits(max_file_bytes=10, max_total_bytes=15, max_files=2, max_chunk_bytes=4)
    with pytest.raises(CapacityError, match="limit is 10"):
        FileReceiver(tmp_path, limits=small).start(header("big", b"x" * 11))
    r = FileReceiver(tmp_path, limits=small)
    r.start(header("a", b"x" * 8))
    r.write(b"x" * 4)
    r.write(b"x" * 4)
    with pytest.raises(CapacityError, match="in total"):
        r.start(header("b", b"x" * 8))
    r = FileReceiver(tmp_path, limits=small)
    r.start(header("a", b"abcdef"))
    with pytest.raises(InvalidRequestError, match="at most 4 bytes"):
        r.write(b"abcdef")
    items = [header("a", b"1"), b"1", header("b", b"2"), b"2", header("c", b"3"), b"3"]
    with pytest.raises(InvalidRequestError, match="more than 2 files"):
        transfer.receive_files(items, tmp_path / "n", limits=small)
    with pytest.raises(CapacityError, match="over the limit"):
        transfer.receive_bytes([header("a", b"abc")], max_bytes=2)
    assert leftovers(tmp_path) == []


class _FullDisk:
    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._fh.close()


def test_a_full_disk_is_a_clean_capacity_error(tmp_path):
    r = FileReceiver(tmp_path, limits=LIMITS)
    r.start(header("f.bin", b"abc"))
    inc = r._open["f.bin"]
    inc.fh = _FullDisk(inc.fh)
    with pytest.raises(CapacityError, match="no space left .* free disk space"):
        r.write(b"abc")
    assert list(tmp_path.iterdir()) == []


def test_announced_files_take_data_in_any_order_and_abort_cleans_up(tmp_path):
    r = FileReceiver(tmp_path, limits=LIMITS)
    r.start(header("a", b"aaaa"), current=False)
    r.start(header("b", b"bb"), current=False)
    r.write(b"aa", name="a")
    r.write(b"bb", name="b")
    r.write(b"aa", name="a")
    with pytest.raises(InvalidRequestError, match="not announced"):
        r.write(b"x", name="c")
    assert leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []  # the error aborted everything
    r = FileReceiver(tmp_path, limits=LIMITS)
    r.start(header("a", b"aaaa"), current=False)
    r.write(b"aaaa", name="a")
    assert [n.as_posix() for n in r.finish()] == ["a"] and (tmp_path / "a").read_bytes() == b"aaaa"
    r = FileReceiver(tmp_path / "x", limits=LIMITS)
    r.start(header("half", b"abcd"))
    r.write(b"ab")
    r.abort()
    assert list((tmp_path / "x").iterdir()) == []


def test_one_sha256_file_helper_in_the_repository():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[3]
    pattern = re.compile(r"^def _?sha256(_file)?\(", re.M)
    found = [p.relative_to(root).as_posix() for d in ("swarm", "node", "coordinator", "bench", "scripts")
             for p in (root / d).rglob("*.py") if pattern.search(p.read_text())]
    assert found == ["swarm/transport/transfer.py"]
