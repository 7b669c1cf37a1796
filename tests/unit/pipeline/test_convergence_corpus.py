"""bench/convergence.py builds its corpus from what every machine with the test dependencies has."""

from __future__ import annotations

import hashlib
import sys

import pytest

from bench.convergence import load_corpus, main


def test_default_corpus_is_this_pythons_stdlib_and_is_recorded_by_hash():
    text, desc = load_corpus("stdlib")
    again, desc_again = load_corpus("stdlib")
    assert text == again and desc == desc_again  # same bytes in the same order on every call
    assert len(text) > 1_000_000  # enough for the gpt2-small preset's pre-training
    assert f"Python {'.'.join(map(str, sys.version_info[:3]))}" in desc
    assert hashlib.sha256(text).hexdigest()[:16] in desc


def test_a_file_corpus_and_an_empty_one(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"hello world\n" * 10)
    text, desc = load_corpus(str(f))
    assert text == b"hello world\n" * 10 and str(f) in desc
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit, match="empty"):
        load_corpus(str(empty))


def test_cli_default_is_stdlib(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "stdlib (default" in " ".join(capsys.readouterr().out.split())
