"""The coordinator's certificate authority: files in its state dir, and what it issues.

- ``ca.key`` / ``ca.pem``: ECDSA P-256 key and self-signed CA certificate (10 years), made on
  the first start and kept (0600): the join token pins the CA's fingerprint, so a new CA means
  a new token for every node.
- ``server.key`` / ``server.pem``: the coordinator's own certificate, re-issued at every start
  (the names it is reached by may change): SANs ``swarm://coordinator``, ``coordinator.swarm``,
  127.0.0.1, localhost, the listen host and any ``--tls-san``. It serves the gRPC port and is
  the client certificate the coordinator presents to nodes (LoadStage, Step...).
- Node certificates (:meth:`CoordinatorCA.issue_node`): for the P-256 key a node sent in its
  signed registration, naming ``swarm://node/<id>``, valid ``node_cert_lifetime_s``.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarm import certs
from swarm.errors import ConfigError

CA_KEY_FILE, CA_CERT_FILE = "ca.key", "ca.pem"
SERVER_KEY_FILE, SERVER_CERT_FILE = "server.key", "server.pem"
SERVER_CERT_LIFETIME_S = 365 * 86400


def _write_0600(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class CoordinatorCA:
    """Loads or creates the CA in ``state_dir``; issues the coordinator's and nodes' certificates."""

    def __init__(self, state_dir: Path, *, now_s: float) -> None:
        state_dir = Path(state_dir)
        key_path, cert_path = state_dir / CA_KEY_FILE, state_dir / CA_CERT_FILE
        if key_path.exists() and cert_path.exists():
            try:
                self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"the CA in {state_dir} is unreadable ({exc}); restore it from a backup, or "
                                  f"move {CA_KEY_FILE}/{CA_CERT_FILE} away to make a new one (every node then "
                                  "needs the new token)") from exc
        elif key_path.exists() or cert_path.exists():
            raise ConfigError(f"{state_dir} holds only one of {CA_KEY_FILE} and {CA_CERT_FILE}; restore the other "
                              "or move both away to make a new CA (every node then needs the new token)")
        else:
            self._key = certs.new_key()
            self._cert = certs.make_ca(self._key, now_s=now_s)
            _write_0600(key_path, certs.key_pem(self._key))
            _write_0600(cert_path, certs.cert_pem(self._cert))
        self.state_dir = state_dir
        self.ca_pem = certs.cert_pem(self._cert)
        self.fingerprint = certs.fingerprint(self.ca_pem)

    def issue_server(self, hosts: list[str], *, now_s: float, write: bool = True) -> tuple[bytes, bytes]:
        """(key PEM, certificate chain PEM: server + CA) for the coordinator; written 0600 unless
        ``write`` is False."""
        names = ["127.0.0.1", "localhost", *[h for h in hosts if h and h not in ("0.0.0.0", "::")]]
        ips = [h for h in names if _is_ip(h)]
        dns = [certs.COORDINATOR_DNS, *[h for h in names if not _is_ip(h)]]
        key = certs.new_key()
        cert = certs.issue(self._key, self._cert, key.public_key(), common_name="swarm coordinator",
                           uris=[certs.COORDINATOR_URI], dns=dns, ips=ips, now_s=now_s,
                           lifetime_s=SERVER_CERT_LIFETIME_S)
        key_pem, chain = certs.key_pem(key), certs.cert_pem(cert) + self.ca_pem
        if write:
            _write_0600(self.state_dir / SERVER_KEY_FILE, key_pem)
            _write_0600(self.state_dir / SERVER_CERT_FILE, chain)
        return key_pem, chain

    def issue_node(self, node_id: str, tls_public_key_der: bytes, *, now_s: float, lifetime_s: float) -> bytes:
        """PEM certificate of node ``node_id`` for its TLS key. Raises AuthError for a bad key."""
        return certs.cert_pem(certs.issue_node(self._key, self._cert, node_id, tls_public_key_der, now_s=now_s,
                                               lifetime_s=lifetime_s))
