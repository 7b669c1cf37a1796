"""Certificates of a swarm: the coordinator's CA, who a certificate names, and the join token.

Pure cryptography (no sockets, no grpc). The coordinator (coordinator/ca.py) keeps a CA and
issues from it; every gRPC channel of the swarm trusts only that CA (swarm/transport/tls.py).

Names in certificates (subject alternative names):
- the coordinator: URI ``swarm://coordinator``, DNS ``coordinator.swarm`` (what clients verify,
  whatever address they dial) plus the hosts it listens on / is reached at;
- a node: URI ``swarm://node/<node id>``, DNS ``<node id>.node.swarm`` (what a peer verifies when
  it dials a node it knows by id) and ``node.swarm`` (any node, e.g. a shard source).

Key types: ECDSA P-256 for the CA and every TLS key. Node ids stay Ed25519 (swarm/identity.py),
but grpcio's BoringSSL does not negotiate Ed25519 certificates (NO_COMMON_SIGNATURE_ALGORITHMS),
so each node makes a P-256 TLS key per process and the coordinator certifies it for the node id
that signed the registration carrying it.

The join token: ``swarm1.<sha256 of the CA certificate's DER, 64 hex>.<secret>``. The
fingerprint lets a node verify the coordinator before it sends anything (as kubeadm's discovery
hash); ``swarm1.<fingerprint>`` alone (no secret) is enough to verify and read, not to join.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarm.errors import AuthError

TOKEN_PREFIX = "swarm1"
FINGERPRINT_HEX_CHARS = 64
COORDINATOR_DNS = "coordinator.swarm"
COORDINATOR_URI = "swarm://coordinator"
COORDINATOR = "coordinator"  # the identity peer_identity() returns for the coordinator
NODE_DNS = "node.swarm"
NODE_URI_PREFIX = "swarm://node/"
_FP_RE = re.compile(r"^[0-9a-f]{64}$")
CLOCK_SKEW_S = 300  # certificates start this much in the past: nodes' clocks may lag


def node_dns(node_id: str) -> str:
    return f"{node_id}.{NODE_DNS}"


def node_uri(node_id: str) -> str:
    return f"{NODE_URI_PREFIX}{node_id}"


# ----------------------------------------------------------------------------- join token
@dataclass(frozen=True, slots=True)
class JoinToken:
    """A parsed token: the CA fingerprint to pin and the secret (None: verify/read only)."""

    fingerprint: str
    secret: str | None = None

    @property
    def text(self) -> str:
        base = f"{TOKEN_PREFIX}.{self.fingerprint}"
        return f"{base}.{self.secret}" if self.secret else base


def format_token(fingerprint: str, secret: str) -> str:
    return JoinToken(fingerprint, secret).text


def parse_token(text: str) -> JoinToken:
    """Parse ``swarm1.<fingerprint>[.<secret>]``; raises AuthError saying what to paste instead."""
    text = (text or "").strip()
    parts = text.split(".", 2)
    if len(parts) < 2 or parts[0] != TOKEN_PREFIX or not _FP_RE.match(parts[1].lower()):
        shown = text[:12] + ("..." if len(text) > 12 else "")
        raise AuthError(
            f"wrong join token {shown!r}: not a {TOKEN_PREFIX} token; use the token the coordinator prints "
            f"(READY ... token={TOKEN_PREFIX}.<CA fingerprint>.<secret>, also in its state dir file 'token')"
        )
    secret = parts[2] if len(parts) == 3 and parts[2] else None
    return JoinToken(parts[1].lower(), secret)


def is_token(text: str) -> bool:
    try:
        parse_token(text)
    except AuthError:
        return False
    return True


# ----------------------------------------------------------------------------- keys and certificates
def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_der(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem_bytes: bytes) -> str:
    """SHA-256 of the certificate's DER, hex: what a token pins."""
    cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def der_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "swarm"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _utc(t_s: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t_s, tz=datetime.timezone.utc)


def make_ca(key, *, now_s: float, lifetime_s: float = 10 * 365 * 86400, name: str = "swarm CA") -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (may sign leaf certificates only)."""
    return (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now_s - CLOCK_SKEW_S)).not_valid_after(_utc(now_s + lifetime_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue(ca_key, ca_cert: x509.Certificate, public_key, *, common_name: str, uris: list[str], dns: list[str],
          ips: list[str] = (), now_s: float, lifetime_s: float) -> x509.Certificate:
    """A leaf certificate for ``public_key`` (TLS server and client) signed by the CA."""
    import ipaddress

    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dict.fromkeys(dns)]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
    return (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now_s - CLOCK_SKEW_S)).not_valid_after(_utc(now_s + lifetime_s))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue_node(ca_key, ca_cert: x509.Certificate, node_id: str, tls_public_key_der: bytes, *, now_s: float,
               lifetime_s: float) -> x509.Certificate:
    """The TLS certificate of node ``node_id`` for its P-256 key (DER SubjectPublicKeyInfo).
    Raises AuthError when the key is not a P-256 public key."""
    try:
        pub = serialization.load_der_public_key(tls_public_key_der)
    except (ValueError, TypeError) as exc:
        raise AuthError("the node's TLS public key is not a DER public key; upgrade the node") from exc
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise AuthError("the node's TLS key must be ECDSA P-256; upgrade the node")
    return issue(ca_key, ca_cert, pub, common_name=f"node {node_id}", uris=[node_uri(node_id)],
                 dns=[node_dns(node_id), NODE_DNS], now_s=now_s, lifetime_s=lifetime_s)


def self_signed_placeholder(key, *, now_s: float) -> x509.Certificate:
    """What a node's peer server presents before it has a certificate: nobody trusts it, so
    every handshake fails until the coordinator certifies the node."""
    ca = make_ca(key, now_s=now_s, lifetime_s=86400, name="swarm node (not registered yet)")
    return ca


def validity(cert_pem_bytes: bytes) -> tuple[float, float]:
    """(not_before, not_after) in unix seconds."""
    cert = x509.load_pem_x509_certificate(cert_pem_bytes)
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def identity_from_uris(uris) -> str | None:
    """``coordinator`` or a node id from a certificate's URI SANs; None if it names neither."""
    from swarm.identity import is_node_id

    for u in uris:
        u = u.decode() if isinstance(u, bytes) else str(u)
        if u == COORDINATOR_URI:
            return COORDINATOR
        if u.startswith(NODE_URI_PREFIX) and is_node_id(u[len(NODE_URI_PREFIX):]):
            return u[len(NODE_URI_PREFIX):]
    return None


def check_node_certificate(cert_pem_bytes: bytes, *, node_id: str, tls_public_key_der: bytes, ca_pem: bytes) -> None:
    """Check a certificate the coordinator issued to this node: signed by the pinned CA, naming
    this node, for this node's TLS key. Raises AuthError."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem_bytes)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature is not a ValueError
        raise AuthError(f"the coordinator sent a certificate its CA did not sign ({exc}); upgrade or re-join") from exc
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    if identity_from_uris(uris) != node_id:
        raise AuthError("the coordinator sent a certificate for another node")
    if cert.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != tls_public_key_der:
        raise AuthError("the coordinator sent a certificate for another key")
