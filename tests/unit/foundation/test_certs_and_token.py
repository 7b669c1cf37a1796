"""Token format, node certificates, and the TLS credentials object (no network)."""

from __future__ import annotations

import time

import pytest

from swarm import certs
from swarm.errors import AuthError
from swarm.transport.lazy_channels import RenewingStub
from swarm.transport.tls import TlsSecurity
from tests.helpers.tls import TestPki

FP = "ab" * 32


def test_token_format_and_old_tokens():
    t = certs.parse_token(f"swarm1.{FP}.s3cret.with.dots")
    assert (t.fingerprint, t.secret) == (FP, "s3cret.with.dots")
    assert certs.parse_token(f"swarm1.{FP.upper()}").secret is None  # read-only form
    assert certs.format_token(FP, "x") == f"swarm1.{FP}.x"
    for bad in ("", "plain-secret-0123456789", f"swarm2.{FP}.x", "swarm1.abc.x", f"swarm1.{'g' * 64}.x"):
        with pytest.raises(AuthError, match="use the token the coordinator prints"):
            certs.parse_token(bad)


def test_node_certificate_names_the_node_and_its_key(tmp_path):
    pki, other = TestPki(tmp_path / "a"), TestPki(tmp_path / "b")
    key = certs.new_key()
    der = certs.public_key_der(key)
    pem = pki.ca.issue_node("c" * 32, der, now_s=time.time(), lifetime_s=60)
    certs.check_node_certificate(pem, node_id="c" * 32, tls_public_key_der=der, ca_pem=pki.ca_pem)
    nb, na = certs.validity(pem)
    assert 59 <= na - time.time() <= 61 and nb < time.time()
    with pytest.raises(AuthError, match="another node"):
        certs.check_node_certificate(pem, node_id="d" * 32, tls_public_key_der=der, ca_pem=pki.ca_pem)
    with pytest.raises(AuthError, match="another key"):
        certs.check_node_certificate(pem, node_id="c" * 32, tls_public_key_der=certs.public_key_der(certs.new_key()),
                                     ca_pem=pki.ca_pem)
    with pytest.raises(AuthError, match="did not sign"):
        certs.check_node_certificate(pem, node_id="c" * 32, tls_public_key_der=der, ca_pem=other.ca_pem)
    with pytest.raises(AuthError, match="P-256"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pki.ca.issue_node("c" * 32, ed, now_s=time.time(), lifetime_s=60)


def test_ca_is_kept_and_fingerprint_is_stable(tmp_path):
    a = TestPki(tmp_path)
    b = TestPki(tmp_path)  # loads the same files
    assert a.ca.fingerprint == b.ca.fingerprint == certs.fingerprint(a.ca_pem)
    import os
    import stat

    for name in ("ca.key", "ca.pem"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_renewal_bumps_the_generation_and_rebuilds_channels(tmp_path):
    pki = TestPki(tmp_path)
    sec = pki.node("c" * 32)
    made = []

    class FakeChannel:
        def __init__(self):
            self.closed = False
            made.append(self)

        def close(self):
            self.closed = True

    stubs = RenewingStub(FakeChannel, lambda ch: ("stub", ch), sec)
    first = stubs.stub
    assert stubs.stub is first and len(made) == 1  # reused while nothing changed
    gen = sec.generation
    sec.set_certificate(pki.node("c" * 32).cert_pem)
    assert sec.generation == gen + 1
    second = stubs.stub
    assert second is not first and len(made) == 2 and made[0].closed
    stubs.close()
    assert made[1].closed


def test_channels_wait_for_the_ca(tmp_path):
    from swarm.errors import UnavailableError
    from swarm.transport.channels import control_channel

    with pytest.raises(UnavailableError, match="not pinned"):
        control_channel("127.0.0.1:1", security=TlsSecurity())
