"""Ed25519 identities: ids from keys, signatures, key files."""

import os
import stat

import pytest

from swarm.errors import AuthError, ConfigError
from swarm.identity import Identity, is_node_id, node_id_for, verify


def test_node_id_derives_from_public_key():
    ident = Identity.from_seed(b"seed-1")
    assert ident.node_id == node_id_for(ident.public_key)
    assert is_node_id(ident.node_id)
    assert Identity.from_seed(b"seed-1").node_id == ident.node_id
    assert Identity.from_seed(b"seed-2").node_id != ident.node_id


def test_verify_accepts_good_and_rejects_tampered():
    ident = Identity.from_seed(b"x")
    sig = ident.sign(b"payload")
    assert verify(ident.public_key, sig, b"payload") == ident.node_id
    with pytest.raises(AuthError, match="bad signature"):
        verify(ident.public_key, sig, b"payloaD")
    other = Identity.from_seed(b"y")
    with pytest.raises(AuthError):
        verify(other.public_key, sig, b"payload")
    with pytest.raises(AuthError, match="64 bytes"):
        verify(ident.public_key, sig[:10], b"payload")
    with pytest.raises(AuthError, match="32 raw bytes"):
        verify(b"short", sig, b"payload")


def test_key_file_created_private_and_reloaded(tmp_path):
    a = Identity.load_or_create(tmp_path)
    path = tmp_path / "identity.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = Identity.load_or_create(tmp_path)
    assert a.node_id == b.node_id


def test_corrupt_key_file_says_what_to_do(tmp_path):
    (tmp_path / "identity.key").write_text("garbage")
    with pytest.raises(ConfigError, match="move it away"):
        Identity.load_or_create(tmp_path)


def test_is_node_id():
    assert not is_node_id("x" * 32)
    assert not is_node_id("a" * 31)
    assert not is_node_id(None)
